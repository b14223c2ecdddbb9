"""Every failure ends in a prompt, named answer, and nothing is lost (issue: failures)."""

import concurrent.futures
import signal
import time

import kombu
import pytest
import requests
from support import (
    BROKER_URL,
    PrivateBroker,
    consumers,
    delete_queues,
    unique_service,
    wait_for,
)


def post(gateway, service, path, body=b"x", timeout=None, **kwargs):
    headers = {"X-ProxyMQ-Timeout": str(timeout)} if timeout else {}
    return requests.post(f"{gateway.url}/{service}{path}", data=body, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def private_broker():
    broker = PrivateBroker()
    broker.start()
    yield broker
    broker.remove()


def test_broker_outage_fails_fast_and_everything_recovers(stack, downstream, private_broker):
    service = unique_service("outage")
    env = {"PROXYMQ_BROKER_URL": private_broker.url}
    worker = stack.worker(service, downstream.url, "--loglevel=INFO", **env, wait=False)
    gateway = stack.gateway(**env)
    wait_for(lambda: post(gateway, service, "/x").status_code == 200, 30, "first answer")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, gateway, service, "/sleep/20", timeout=60)
        wait_for(lambda: any(s.raw_uri == "/sleep/20" for s in downstream.seen), 10, "call")
        private_broker.stop()
        started = time.monotonic()
        assert waiting.result().status_code == 503  # its reply queue died with the broker
        assert time.monotonic() - started < 5
    assert waiting.result().headers["X-ProxyMQ-Error"] == "broker-unavailable"

    started = time.monotonic()
    response = post(gateway, service, "/x")
    assert (response.status_code, response.headers["X-ProxyMQ-Error"]) == (
        503,
        "broker-unavailable",
    )
    assert int(response.headers["Retry-After"]) > 0
    assert time.monotonic() - started < 3  # at once, not after the reply timeout (120 s)
    assert requests.get(gateway.url + "/readyz").status_code == 503

    private_broker.start()
    wait_for(lambda: requests.get(gateway.url + "/readyz").ok, 30, "gateway to reconnect")
    wait_for(lambda: post(gateway, service, "/again", timeout=5).ok, 60, "worker back")
    for i in range(5):
        answer = post(gateway, service, f"/after/{i}", f"after {i}".encode(), timeout=10)
        assert answer.content == f"after {i}".encode(), (
            f"{answer.status_code} {answer.text}\n{gateway.process.log()[-3000:]}\n"
            f"{worker.log()[-3000:]}"
        )


def test_full_queue_sheds_with_503_and_queued_requests_wait_for_a_worker(stack, downstream):
    service = unique_service("full")
    worker = stack.worker(service, downstream.url, PROXYMQ_QUEUE_MAX_LENGTH="2")
    worker.stop()  # the queue stays, with its limit, and nobody consumes it
    gateway = stack.gateway()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(post, gateway, service, f"/q{i}", b"q", timeout=30) for i in range(2)]
        wait_for(lambda: _depth(f"{service}_requests") == 2, 10, "two queued requests")
        shed = post(gateway, service, "/x")
        assert shed.status_code == 503
        assert shed.headers["X-ProxyMQ-Error"] == "queue-full"
        assert int(shed.headers["Retry-After"]) > 0
        stack.worker(service, downstream.url, PROXYMQ_QUEUE_MAX_LENGTH="2")
        assert [f.result().status_code for f in queued] == [200, 200]


def test_a_full_queue_answers_queue_full_at_once(stack, downstream):
    """Shedding load is the point of a length limit: the nack of a full queue is answered
    without the retry that a failover's nack gets (gateway/refusals.py)."""
    service = unique_service("fullnow")
    worker = stack.worker(service, downstream.url, PROXYMQ_QUEUE_MAX_LENGTH="2")
    worker.stop()  # the queue stays, with its limit, and nobody consumes it
    with kombu.Connection(BROKER_URL) as connection:
        producer = connection.Producer()
        for _ in range(2):
            producer.publish(b"filler", routing_key=f"{service}_requests")
    gateway = stack.gateway()
    for attempt in range(3):  # the first asks the broker how full the queue is
        started = time.monotonic()
        shed = post(gateway, service, f"/x{attempt}", timeout=10)
        took = time.monotonic() - started
        assert (shed.status_code, shed.headers["X-ProxyMQ-Error"]) == (503, "queue-full")
        assert int(shed.headers["Retry-After"]) > 0
        assert took < 1, f"attempt {attempt}: queue-full after {took:.2f} s"


def test_a_publish_refused_while_its_queue_holds_nothing_is_retried_until_broker_unavailable(
    stack,
):
    """A nack from a queue that holds no message is not a full queue's (ProxyMQ's limits
    are at least 1): it is what a quorum queue without a reachable leader answers. The
    gateway tries again within the deadline, at most RETRY_FOR seconds, then answers
    broker-unavailable. A queue that refuses everything stands in for that cluster."""
    service = unique_service("refuses")
    with kombu.Connection(BROKER_URL) as connection:
        arguments = {"x-max-length": 0, "x-overflow": "reject-publish"}
        connection.default_channel.queue_declare(
            f"{service}_requests", durable=False, auto_delete=False, arguments=arguments
        )
    gateway = stack.gateway()
    try:
        for deadline, within in ((10, (2.5, 5)), (1, (0.5, 1.5))):
            started = time.monotonic()
            refused = post(gateway, service, "/x", timeout=deadline)
            took = time.monotonic() - started
            assert refused.status_code == 503
            assert refused.headers["X-ProxyMQ-Error"] == "broker-unavailable"
            assert within[0] < took < within[1], f"deadline {deadline}: answered after {took}"
    finally:
        delete_queues(f"{service}_requests")


def _depth(queue: str) -> int:
    with kombu.Connection(BROKER_URL) as connection:
        _, count, _ = connection.default_channel.queue_declare(queue, passive=True)
        return count


def test_expired_request_never_reaches_the_downstream(stack, downstream):
    service = unique_service("expire")
    worker = stack.worker(service, downstream.url)
    worker.stop()
    gateway = stack.gateway()
    response = post(gateway, service, "/late", timeout=0.5)
    assert response.status_code == 504
    cid = response.headers["X-Correlation-ID"]
    stack.worker(service, downstream.url)
    assert post(gateway, service, "/after").status_code == 200
    assert downstream.requests_for(cid) == []


def test_request_that_keeps_killing_workers_is_dead_lettered_and_answered_poison(stack, downstream):
    service = unique_service("poison")
    gateway = stack.gateway()
    worker = stack.worker(service, downstream.url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(post, gateway, service, "/sleep/30", b"deadly", timeout=90)
        for delivery in (1, 2, 3):
            wait_for(
                lambda n=delivery: sum(s.raw_uri == "/sleep/30" for s in downstream.seen) >= n,
                30,
                f"delivery {delivery}",
            )
            worker.signal(signal.SIGKILL)
            worker.popen.wait(10)
            worker = stack.worker(service, downstream.url)
        response = future.result()
    assert response.status_code == 502
    assert response.headers["X-ProxyMQ-Error"] == "poison"
    calls = [s for s in downstream.seen if s.raw_uri == "/sleep/30"]
    counts = [dict(s.headers)["X-Proxymq-Delivery-Count"] for s in calls]
    assert counts == ["1", "2", "3"]
    assert len({dict(s.headers)["X-Correlation-Id"] for s in calls}) == 1
    dead = _get_one(f"{service}_requests.dead")
    assert dead.headers["x-proxymq-dead-reason"].startswith("3 deliveries")


def _get_one(queue: str, channel=None):
    """Take one message off ``queue`` as it is (undecoded)."""
    if channel is None:
        with kombu.Connection(BROKER_URL) as connection:
            return _get_one(queue, connection.default_channel)
    deadline = time.monotonic() + 10
    while (message := channel.basic_get(queue, no_ack=True)) is None:
        assert time.monotonic() < deadline, f"nothing arrived in {queue}"
        time.sleep(0.1)
    return message


def test_undecodable_message_is_dead_lettered_at_once_and_its_client_told(stack, downstream):
    service = unique_service("garbage")
    stack.worker(service, downstream.url)
    with kombu.Connection(BROKER_URL) as connection:
        channel = connection.channel()
        reply_queue, _, _ = channel.queue_declare("", exclusive=True)
        producer = kombu.Producer(channel)
        producer.publish(
            b"\xc1\xc1 not msgpack",
            routing_key=f"{service}_requests",
            content_type="application/x-msgpack",
            content_encoding="binary",
            headers={"task": "proxymq.forward", "id": "garbage-1", "lang": "py"},
            correlation_id="garbage-1",
            reply_to=reply_queue,
        )
        reply = _get_one(reply_queue, channel)
    from proxymq.envelope import decode_reply

    answer = decode_reply(reply.body)
    assert (answer.status, answer.error) == (502, "poison")
    dead = _get_one(f"{service}_requests.dead")
    assert dead.body == b"\xc1\xc1 not msgpack"
    assert "cannot be decoded" in dead.headers["x-proxymq-dead-reason"]


def _three_held(pool, gateway, service, downstream) -> list[concurrent.futures.Future]:
    """Three requests (bodies b"0", b"1", b"2") that the downstream is now sleeping on."""
    before = sum(s.raw_uri == "/sleep/1" for s in downstream.seen)
    futures = [pool.submit(post, gateway, service, "/sleep/1", b"%d" % i) for i in range(3)]
    wait_for(
        lambda: sum(s.raw_uri == "/sleep/1" for s in downstream.seen) >= before + 3, 10, "calls"
    )
    return futures


def test_sigterm_to_a_worker_finishes_what_it_holds(stack, downstream):
    service = unique_service("drain")
    worker = stack.worker(service, downstream.url)
    gateway = stack.gateway()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = _three_held(pool, gateway, service, downstream)
        worker.signal(signal.SIGTERM)  # warm shutdown: stop consuming, finish, then exit
        assert [f.result().status_code for f in futures] == [200] * 3
    worker.popen.wait(20)
    assert consumers(f"{service}_requests") == 0


def test_sigterm_to_the_gateway_answers_what_it_holds(stack, downstream):
    service = unique_service("gwdrain")
    stack.worker(service, downstream.url)
    gateway = stack.gateway()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = _three_held(pool, gateway, service, downstream)
        gateway.process.signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert [(r.status_code, r.content) for r in responses] == [
        (200, f"{i}".encode()) for i in range(3)
    ]
    gateway.process.popen.wait(15)  # keep-alive (5 s) plus what it held


def test_health_gate_holds_consumption_until_the_downstream_is_healthy(stack, downstream):
    service = unique_service("health")
    downstream.healthy = False
    worker = stack.worker(
        service,
        downstream.url,
        "--loglevel=INFO",
        PROXYMQ_HEALTH_URL=downstream.url + "/health",
        wait=False,
    )
    gateway = stack.gateway()
    wait_for(lambda: "unhealthy: stopping" in worker.log(), 30, "worker to hold consumption")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(post, gateway, service, "/gated", b"held", timeout=30)
        wait_for(lambda: _depth(f"{service}_requests") == 1, 10, "request queued")
        time.sleep(3)  # more than one health check interval: it must stay queued
        assert _depth(f"{service}_requests") == 1
        assert consumers(f"{service}_requests") == 0
        downstream.healthy = True
        response = future.result()
    assert (response.status_code, response.content) == (200, b"held")
    downstream.healthy = False
    wait_for(lambda: consumers(f"{service}_requests") == 0, 10, "consumer stopped")
    downstream.healthy = True
    wait_for(lambda: consumers(f"{service}_requests") == 1, 10, "consumer resumed")


def test_quorum_queue_serves_requests_and_counts_deliveries_natively(stack, downstream):
    import subprocess

    service = unique_service("quorum")
    worker = stack.worker(service, downstream.url, PROXYMQ_QUEUE_TYPE="quorum")
    gateway = stack.gateway()
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "type"], capture_output=True, text=True
    ).stdout
    assert f"{service}_requests\tquorum" in listing
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(post, gateway, service, "/sleep/3", b"q", timeout=60)
        wait_for(lambda: any(s.raw_uri == "/sleep/3" for s in downstream.seen), 10, "call")
        worker.signal(signal.SIGKILL)
        worker.popen.wait(10)
        stack.worker(service, downstream.url, PROXYMQ_QUEUE_TYPE="quorum")
        assert future.result().status_code == 200
    counts = [
        dict(s.headers)["X-Proxymq-Delivery-Count"]
        for s in downstream.seen
        if s.raw_uri == "/sleep/3"
    ]
    assert counts == ["1", "2"]

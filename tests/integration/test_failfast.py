"""Failing fast: workers announce each service's state on ``proxymq.status``, and a gateway
answers a synchronous request that cannot be served in time at once, without publishing.

The gateway's side is driven by statuses this test publishes itself (the gateway must not
care who sets a breaker or a pause); the workers' side (drain rate, depth) by real workers
against a slow downstream.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
import uuid

import kombu
import pytest
import requests
from support import (
    BROKER_URL,
    PrivateBroker,
    Scrape,
    broker_user,
    delete_queues,
    queue_counts,
    running_stack,
    unique_service,
    wait_for,
)

from proxymq import status as wire

RESULT_URL = "redis://127.0.0.1:6379/0"


def announce(service: str, url: str = BROKER_URL, user: str = "guest", **fields) -> None:
    """Publish one status for ``service`` as broker user ``user`` (a worker would)."""
    status = {
        "service": service,
        "worker": "test-worker",
        "sent_at": time.time(),
        "breaker_open_until": None,
        "paused_until": None,
        "drain_rate": 0.0,
        "depth": 0,
        "held": 0,
        **fields,
    }
    with kombu.Connection(url) as connection:
        exchange = kombu.Exchange(wire.EXCHANGE, wire.EXCHANGE_TYPE, durable=True)
        producer = connection.Producer(exchange=exchange)
        producer.publish(
            json.dumps(status).encode(),
            content_type=wire.CONTENT_TYPE,
            content_encoding="binary",
            user_id=user,
            declare=[exchange],
        )


def declare_queue(service: str) -> str:
    """The service's queue with no consumer: what a request published to it leaves there."""
    queue = f"{service}_requests"
    with kombu.Connection(BROKER_URL) as connection:
        connection.default_channel.queue_declare(queue, durable=True, auto_delete=False)
    return queue


class StatusTap:
    """A queue bound to ``proxymq.status``: every announcement, as a gateway gets it."""

    def __init__(self, url: str = BROKER_URL) -> None:
        self._connection = kombu.Connection(url)
        channel = self._connection.channel()
        channel.exchange_declare(wire.EXCHANGE, wire.EXCHANGE_TYPE, durable=True, auto_delete=False)
        self.queue, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True)
        channel.queue_bind(self.queue, wire.EXCHANGE)
        self._channel = channel

    def of(self, service: str) -> list[tuple[dict, dict]]:
        """``(status, properties)`` of ``service`` that arrived since the last call."""
        got = []
        while (message := self._channel.basic_get(self.queue, no_ack=True)) is not None:
            status = json.loads(message.body)
            if status["service"] == service:
                got.append((status, message.properties))
        return got

    def close(self) -> None:
        self._connection.release()


def refusing(gateway, service: str):
    """A condition: the gateway refuses a request to ``service`` (503). Each try has 0.5 s:
    one made before the announcement arrived is published and waits for its deadline."""
    url, short = f"{gateway.url}/{service}/x", {"X-ProxyMQ-Timeout": "0.5"}
    return lambda: requests.post(url, headers=short, timeout=30).status_code == 503


@pytest.fixture(scope="module")
def gateway(stack):
    return stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)


@pytest.fixture
def idle_service():
    """A service whose queue exists and nobody consumes."""
    service = unique_service("ff")
    declare_queue(service)
    yield service
    delete_queues(f"{service}_requests")


def refused_with(gateway, service: str, code: str, **headers) -> requests.Response:
    response = requests.post(f"{gateway.url}/{service}/x", data=b"x", headers=headers, timeout=30)
    assert response.status_code == 503, response.text
    assert response.headers["X-ProxyMQ-Error"] == code
    return response


def test_open_breaker_answers_503_at_once_and_publishes_nothing(gateway, idle_service):
    service = idle_service
    announce(service, breaker_open_until=time.time() + 30)

    def refused() -> bool:
        response = requests.post(f"{gateway.url}/{service}/x", data=b"x", timeout=30)
        return response.headers.get("X-ProxyMQ-Error") == "service-unavailable"

    wait_for(refused, 10, "the gateway to know the breaker is open")
    started = time.monotonic()
    response = refused_with(gateway, service, "service-unavailable")
    assert time.monotonic() - started < 1.0  # a 120 s timeout otherwise
    assert 25 <= int(response.headers["Retry-After"]) <= 30
    assert response.json()["error"] == "service-unavailable"
    assert queue_counts(f"{service}_requests") == (0, 0)  # nothing was published
    shed = Scrape(gateway.url + "/metrics")
    assert shed.value("proxymq_gateway_shed_total", service=service) >= 2


def test_a_paused_service_is_unavailable_until_the_pause_ends(gateway, idle_service):
    service = idle_service
    announce(service, paused_until=time.time() + 5)
    wait_for(
        refusing(gateway, service),
        10,
        "the pause to be known",
    )
    assert int(refused_with(gateway, service, "service-unavailable").headers["Retry-After"]) <= 5
    announce(service, paused_until=time.time() - 1)  # over: requests are published again
    response = requests.post(
        f"{gateway.url}/{service}/x", headers={"X-ProxyMQ-Timeout": "0.5"}, timeout=30
    )
    assert response.headers["X-ProxyMQ-Error"] == "timeout"  # published, waited, expired


def test_jobs_and_prefer_wait_are_accepted_while_the_breaker_is_open(gateway, idle_service):
    service = idle_service
    announce(service, breaker_open_until=time.time() + 30)
    wait_for(
        refusing(gateway, service),
        10,
        "the breaker to be known",
    )
    for prefer in ("respond-async", "respond-async, wait=1"):
        response = requests.post(f"{gateway.url}/{service}/x", headers={"Prefer": prefer})
        assert response.status_code == 202, response.text
    wait_for(lambda: queue_counts(f"{service}_requests")[0] == 2, 10, "both jobs queued")


def test_a_backlog_refuses_a_short_deadline_and_serves_a_long_one(stack, gateway, downstream):
    """Real workers and a real backlog: -c 2 against a 0.5 s downstream drains ~4/s."""
    service = unique_service("ffbacklog")
    stack.worker(service, downstream.url, "-c", "2")
    slow = {"X-ProxyMQ-Timeout": "120"}
    with concurrent.futures.ThreadPoolExecutor(80) as pool:
        backlog = [
            pool.submit(requests.post, f"{gateway.url}/{service}/sleep/0.5", headers=slow)
            for _ in range(80)
        ]
        short = {"X-ProxyMQ-Timeout": "5"}

        def short_refused() -> bool:
            url = f"{gateway.url}/{service}/sleep/0.5"
            return requests.post(url, headers=short, timeout=30).status_code == 503

        wait_for(short_refused, 20, "a 5 s request to be refused", interval=0.5)
        started = time.monotonic()
        response = refused_with(gateway, service, "deadline-unreachable", **short)
        assert time.monotonic() - started < 1.0
        assert int(response.headers["Retry-After"]) > 5
        served = requests.post(
            f"{gateway.url}/{service}/sleep/0.5", headers={"X-ProxyMQ-Timeout": "60"}, timeout=90
        )
        assert served.status_code == 200, served.text
        assert all(f.result().status_code == 200 for f in backlog)


def test_as_a_backlog_begins_a_request_with_time_to_spare_is_served(stack, gateway, downstream):
    """Before a round with a backlog from its start to its end, a worker has seen only how
    fast requests arrived: a wait estimated from that refused requests that would have
    been served (``bench/failfast.py``: 5 of 5 with 60 s to spare). -c 2 against 0.5 s
    drains 4 a second: 80 requests are 20 s of work, and one with 40 s is served."""
    service = unique_service("ffbegin")
    tap = StatusTap()
    try:
        stack.worker(service, downstream.url, "-c", "2")
        wait_for(lambda: tap.of(service), 10, "a first announcement")
        url = f"{gateway.url}/{service}/sleep/0.5"
        slow = {"X-ProxyMQ-Timeout": "120"}
        with concurrent.futures.ThreadPoolExecutor(80) as pool:
            backlog = [
                pool.submit(requests.post, url, headers=slow, timeout=150) for _ in range(80)
            ]

            def backlog_announced() -> bool:
                return any(status["depth"] > 40 for status, _ in tap.of(service))

            wait_for(backlog_announced, 20, "the backlog announced", interval=0.05)
            spare = requests.post(url, headers={"X-ProxyMQ-Timeout": "40"}, timeout=60)
            assert spare.status_code == 200, spare.text
            assert all(f.result().status_code == 200 for f in backlog)
    finally:
        tap.close()


def test_workers_announce_their_drain_rate_and_the_queue_depth(stack, gateway, downstream):
    """A worker -c 2 against a 0.2 s downstream drains at most 10 requests a second."""
    service = unique_service("ffrate")
    tap = StatusTap()
    try:
        stack.worker(service, downstream.url, "-c", "2")
        wait_for(lambda: tap.of(service), 10, "a first announcement")
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            calls = [
                pool.submit(requests.post, f"{gateway.url}/{service}/sleep/0.2", timeout=120)
                for _ in range(80)
            ]
            seen: list[tuple[dict, dict]] = []

            def announced_a_rate() -> bool:
                seen.extend(tap.of(service))
                return any(s["depth"] > 0 and s["drain_rate"] > 3 for s, _ in seen)

            wait_for(announced_a_rate, 20, "a depth and a drain rate", interval=0.2)
            assert all(f.result().status_code == 200 for f in calls)
        status, properties = seen[-1]
        assert status["drain_rate"] < 12  # it cannot drain faster than 2 / 0.2 s
        assert properties["user_id"] == "guest"
        assert status["breaker_open_until"] is None and status["paused_until"] is None
        # Every 2 s: over 4 s at least two more arrive.
        tap.of(service)
        time.sleep(4.5)  # time is the feature: the announcements' period
        assert len(tap.of(service)) >= 2
    finally:
        tap.close()


def test_workers_gone_after_10_s_requests_are_published_as_today(gateway, idle_service):
    service = idle_service
    announce(service, breaker_open_until=time.time() + 120)
    wait_for(
        refusing(gateway, service),
        10,
        "the breaker to be known",
    )
    announced = time.monotonic()

    def published() -> bool:
        response = requests.post(
            f"{gateway.url}/{service}/x", headers={"X-ProxyMQ-Timeout": "0.2"}, timeout=30
        )
        return response.headers.get("X-ProxyMQ-Error") == "timeout"

    wait_for(published, 20, "the state to be too old")
    assert time.monotonic() - announced >= wire.MAX_AGE - 1


def test_a_status_from_a_user_outside_reply_users_is_ignored(stack, idle_service):
    service = idle_service
    gateway = stack.gateway(PROXYMQ_REPLY_USERS="guest")
    with broker_user() as (intruder, url):
        announce(service, url=url, user=intruder, breaker_open_until=time.time() + 60)
    timed_out = requests.post(
        f"{gateway.url}/{service}/x", headers={"X-ProxyMQ-Timeout": "1"}, timeout=30
    )
    assert timed_out.headers["X-ProxyMQ-Error"] == "timeout"  # published as usual
    announce(service, breaker_open_until=time.time() + 60)  # guest is a reply user
    wait_for(
        refusing(gateway, service),
        10,
        "the reply user's status to count",
    )


def test_a_status_sent_to_the_queue_by_name_is_ignored(stack, idle_service, gateway):
    """Anyone who can publish to the default exchange can reach a gateway's queue by its
    name; only what the status exchange routed counts."""
    service = idle_service
    with kombu.Connection(BROKER_URL) as connection:
        channel = connection.default_channel
        status_queues = _gateway_status_queues(channel)
        assert status_queues
        body = json.dumps(
            {
                "service": service,
                "worker": "forged",
                "sent_at": time.time(),
                "breaker_open_until": time.time() + 60,
                "drain_rate": 0,
                "depth": 0,
            }
        )
        producer = connection.Producer()
        for queue in status_queues:
            producer.publish(body, exchange="", routing_key=queue, content_type=wire.CONTENT_TYPE)
    response = requests.post(
        f"{gateway.url}/{service}/x", headers={"X-ProxyMQ-Timeout": "1"}, timeout=30
    )
    assert response.headers["X-ProxyMQ-Error"] == "timeout"


def _gateway_status_queues(channel) -> list[str]:
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_bindings", "source_name", "destination_name"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return [
        line.split("\t")[1]
        for line in listing.splitlines()
        if line.startswith(wire.EXCHANGE + "\t") and line.split("\t")[1].startswith("amq.gen-")
    ]


def test_every_gateway_process_sees_the_state(stack, idle_service):
    service = idle_service
    gateway = stack.gateway(workers=3)
    streak = 0  # requests refused in a row, each on a fresh connection

    def thirty_refused_in_a_row() -> bool:
        nonlocal streak
        # As workers do, every round: a process that bound its queue late gets the next.
        announce(service, breaker_open_until=time.time() + 60)
        for _ in range(10):
            response = requests.post(
                f"{gateway.url}/{service}/x",
                headers={"Connection": "close", "X-ProxyMQ-Timeout": "1"},
                timeout=30,
            )
            streak = streak + 1 if response.status_code == 503 else 0
        return streak >= 30

    wait_for(thirty_refused_in_a_row, 60, "every process to refuse", interval=0.1)
    assert queue_counts(f"{service}_requests") == (0, 0)


def test_a_queued_job_shows_its_estimated_start(gateway, idle_service):
    service = idle_service
    announce(service, drain_rate=10.0, depth=100)  # 10 s of work ahead
    wait_for(
        lambda: (
            requests.post(
                f"{gateway.url}/{service}/x", headers={"X-ProxyMQ-Timeout": "5"}, timeout=30
            ).status_code
            == 503
        ),
        10,
        "the backlog to be known",
    )
    accepted = requests.post(f"{gateway.url}/{service}/x", headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202
    polled = requests.get(gateway.url + accepted.headers["Location"]).json()
    assert polled["status"] == "queued"
    assert 5 <= polled["eta_seconds"] <= 10.5, polled


@pytest.fixture
def role_users():
    """Broker users ``gateway-<hex>`` and ``workers-<hex>`` with the permissions
    deploy/helm/proxymq/files/rabbitmq-start.sh gives those roles; their URLs."""
    from deploy.test_broker_users import users

    roles, made = users(), []
    tag = uuid.uuid4().hex[:6]
    ctl = ["rabbitmqctl", "-q"]
    urls = {}
    try:
        for role in ("gateway", "workers"):
            name, password = f"{role}-{tag}", uuid.uuid4().hex
            subprocess.run([*ctl, "add_user", name, password], check=True, capture_output=True)
            made.append(name)
            permissions = [roles[role][p] for p in ("configure", "write", "read")]
            subprocess.run(
                [*ctl, "set_permissions", "-p", "/", name, *permissions],
                check=True,
                capture_output=True,
            )
            urls[role] = (name, BROKER_URL.replace("guest:guest", f"{name}:{password}"))
        yield urls
    finally:
        for name in made:
            subprocess.run([*ctl, "delete_user", name], capture_output=True)


def test_the_deployed_permissions_let_workers_announce_and_gateways_listen(
    stack, downstream, role_users
):
    service = unique_service("ffperm")
    workers_user, workers_url = role_users["workers"]
    _, gateway_url = role_users["gateway"]
    tap = StatusTap()
    try:
        worker = stack.worker(service, downstream.url, PROXYMQ_BROKER_URL=workers_url)
        gateway = stack.gateway(PROXYMQ_BROKER_URL=gateway_url, PROXYMQ_REPLY_USERS=workers_user)
        seen: list[tuple[dict, dict]] = []
        wait_for(lambda: seen.extend(tap.of(service)) or seen, 10, "an announcement")
        assert {properties["user_id"] for _, properties in seen} == {workers_user}
        served = requests.post(f"{gateway.url}/{service}/x", data=b"ok", timeout=30)
        assert served.status_code == 200
        assert "not reading" not in gateway.process.log()  # it bound its status queue
        assert "status channel closed" not in worker.log()  # it declared and published
    finally:
        tap.close()
        delete_queues(f"{service}_requests")


def test_after_a_broker_restart_workers_announce_and_gateways_listen_again(downstream):
    """Both sides set up again on reconnect: the worker's timer, the gateway's queue."""
    broker = PrivateBroker()
    broker.start()
    service = unique_service("ffrestart")
    try:
        with running_stack() as stack:
            # Its start is awaited by its first announcement (consumers() asks the shared broker).
            stack.worker(service, downstream.url, wait=False, PROXYMQ_BROKER_URL=broker.url)
            gateway = stack.gateway(PROXYMQ_BROKER_URL=broker.url)
            for round_ in ("before", "after"):
                tap = StatusTap(broker.url)
                try:
                    wait_for(lambda t=tap: t.of(service), 30, f"an announcement {round_}")
                finally:
                    tap.close()

                def refused() -> bool:
                    announce(service, url=broker.url, breaker_open_until=time.time() + 60)
                    url = f"{gateway.url}/{service}/x"
                    return requests.post(url, timeout=30).status_code == 503

                wait_for(refused, 30, f"the gateway to read states {round_}", interval=0.5)
                announce(service, url=broker.url, breaker_open_until=time.time() - 1)
                if round_ == "before":
                    broker.stop()
                    broker.start()
                    wait_for(
                        lambda: requests.get(gateway.url + "/readyz", timeout=5).ok,
                        60,
                        "the gateway to reconnect",
                    )
    finally:
        broker.remove()


def test_a_gateway_not_allowed_to_read_states_serves_as_before(stack, downstream):
    """A broker set up before this feature (the gateway user's old permissions): the
    gateway says once that it does not read the states, and serves as it did."""
    name, password = f"oldgateway-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_user", name, password], check=True, capture_output=True)
    service = unique_service("ffold")
    try:
        old = ["^amq\\.gen-.*$", "^amq\\.default$", "^amq\\.gen-.*$"]
        subprocess.run(
            [*ctl, "set_permissions", "-p", "/", name, *old], check=True, capture_output=True
        )
        stack.worker(service, downstream.url)
        url = BROKER_URL.replace("guest:guest", f"{name}:{password}")
        gateway = stack.gateway(PROXYMQ_BROKER_URL=url)
        served = requests.post(f"{gateway.url}/{service}/x", data=b"ok", timeout=30)
        assert (served.status_code, served.content) == (200, b"ok")
        assert "not reading proxymq.status" in gateway.process.log()
    finally:
        subprocess.run([*ctl, "delete_user", name], capture_output=True)


def test_a_deleted_status_exchange_is_declared_again_and_the_worker_serves_on(downstream):
    """The broker closes the announcer's channel (404: no such exchange) under it: the
    worker takes that quietly (py-amqp would raise it out of Celery's event loop and
    restart the consumer), goes on serving, and announces again on a fresh channel. On a
    broker of its own, so that this worker is the only one announcing."""
    broker = PrivateBroker()
    broker.start()
    service = unique_service("ffdeleted")
    try:
        with running_stack() as stack:
            worker = stack.worker(
                service, downstream.url, wait=False, PROXYMQ_BROKER_URL=broker.url
            )
            gateway = stack.gateway(PROXYMQ_BROKER_URL=broker.url)
            tap = StatusTap(broker.url)
            try:
                wait_for(lambda: tap.of(service), 30, "a first announcement")
            finally:
                tap.close()
            with kombu.Connection(broker.url) as connection:
                connection.default_channel.exchange_delete(wire.EXCHANGE)
            wait_for(
                lambda: "status channel closed by the broker" in worker.log(),
                10,
                "the worker to publish to the missing exchange",
            )

            def exchange_back() -> bool:
                with kombu.Connection(broker.url) as connection:
                    try:
                        connection.channel().exchange_declare(
                            wire.EXCHANGE, wire.EXCHANGE_TYPE, passive=True
                        )
                    except connection.channel_errors:
                        return False
                    return True

            wait_for(exchange_back, 10, "the worker to declare the exchange again", 0.5)
            tap = StatusTap(broker.url)
            try:
                wait_for(lambda: tap.of(service), 10, "announcements again")
            finally:
                tap.close()
            served = requests.post(f"{gateway.url}/{service}/x", data=b"ok", timeout=30)
            assert (served.status_code, served.content) == (200, b"ok")
            assert worker.alive()
            assert "Connection to broker lost" not in worker.log()  # the consumer went on
    finally:
        broker.remove()


def test_a_status_with_an_absurd_number_drops_no_request_in_flight(stack, gateway, downstream):
    """The status queue is read by the greenlet that reads the replies: a status that
    raised there would drop the broker link, and every reply on its way with it."""
    service = unique_service("ffabsurd")
    stack.worker(service, downstream.url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(requests.post, f"{gateway.url}/{service}/sleep/3", timeout=60)
        wait_for(lambda: queue_counts(f"{service}_requests") == (0, 1), 10, "the call taken")
        with kombu.Connection(BROKER_URL) as connection:
            producer = connection.Producer()
            body = b'{"service":"%s","worker":"w","sent_at":1,"drain_rate":1,"depth":1%s}' % (
                service.encode(),
                b"0" * 400,
            )
            producer.publish(body, exchange=wire.EXCHANGE, content_type=wire.CONTENT_TYPE)
        assert in_flight.result().status_code == 200
    assert "broker connection lost" not in gateway.process.log()


def test_a_repeat_with_an_idempotency_key_is_replayed_while_the_breaker_is_open(
    stack, gateway, downstream
):
    """Its answer is kept: replaying it publishes nothing and needs no service."""
    service = unique_service("ffreplay")
    worker = stack.worker(service, downstream.url)
    keyed = {"Idempotency-Key": uuid.uuid4().hex}
    first = requests.post(f"{gateway.url}/{service}/echo", data=b"once", headers=keyed, timeout=30)
    assert first.status_code == 200, first.text
    stack.stop_process(worker)  # its announcements (closed) would race the open breaker's
    announce(service, breaker_open_until=time.time() + 60)
    wait_for(
        refusing(gateway, service),
        10,
        "the breaker to be known",
    )
    repeat = requests.post(f"{gateway.url}/{service}/echo", data=b"once", headers=keyed, timeout=30)
    assert repeat.status_code == 200, repeat.text
    assert repeat.headers["Idempotent-Replayed"] == "true"
    assert repeat.content == first.content


def test_a_deleted_queue_silences_no_other_service_of_its_worker(stack, downstream):
    """A worker serving two services whose queue of one is deleted: the passive declare
    of that queue closes the announcer's channel, which must not drop the other's status
    with it (until Celery notices the cancelled consumer and declares the queue again)."""
    gone, kept = unique_service("ffgone"), unique_service("ffkept")
    queues = f"{gone}_requests,{kept}_requests"
    stack.worker(queues.removesuffix("_requests"), downstream.url, wait=False)
    tap = StatusTap()
    try:
        wait_for(lambda: tap.of(kept), 30, "a first announcement")
        delete_queues(f"{gone}_requests")
        last, longest, until = time.monotonic(), 0.0, time.monotonic() + 12
        while time.monotonic() < until:  # time is the feature: the announcements' period
            if tap.of(kept):
                longest, last = max(longest, time.monotonic() - last), time.monotonic()
            time.sleep(0.1)
        longest = max(longest, time.monotonic() - last)
        assert longest < wire.MAX_AGE / 2, f"{kept} silent for {longest:.1f} s"
    finally:
        tap.close()
        delete_queues(f"{kept}_requests")

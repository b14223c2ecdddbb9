"""Batch mode end to end: real gateway, real worker (``PROXYMQ_BATCH_URL``), real broker.

The batch downstream is an HTTP server in the test process that records every batch
call (its items, how many calls were in flight at once) and answers per SPEC.md's batch
contract. Item paths pick a behaviour: ``/slow/<s>`` makes the whole call wait,
``/missing`` leaves the item out of the answer, ``/fail-batch``, ``/malformed`` and
``/not-array`` break the whole answer, ``/big/<n>`` answers n bytes; anything else echoes
the item's body.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import amqp
import kombu
import pytest
import requests
from support import (
    BROKER_URL,
    consumers,
    delete_queues,
    free_port,
    poll_until_done,
    unique_service,
    wait_for,
)
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from proxymq.envelope import RequestEnvelope, decode_reply, task_message


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    items: list[dict]


@dataclass
class BatchDownstream:
    """A batch endpoint that records its calls; ``/batch/<anything>`` all work alike."""

    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.server = make_server("127.0.0.1", self.port, self._app, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def items(self) -> list[dict]:
        with self._lock:
            return [item for call in self.calls for item in call.items]

    def sizes(self) -> list[int]:
        with self._lock:
            return [len(call.items) for call in self.calls]

    def _app(self, environ, start_response):
        request = Request(environ)
        items = json.loads(request.get_data())
        with self._lock:
            self.calls.append(Call(request.path, dict(request.headers), items))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._answer(items)(environ, start_response)
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _answer(items: list[dict]) -> Response:
        paths = {item["path"] for item in items}
        for path in paths:
            if path.startswith("/slow/"):
                time.sleep(float(path.split("/")[2]))
        if "/fail-batch" in paths:
            return Response("no", status=500)
        if "/malformed" in paths:
            return Response("[{not json", content_type="application/json")
        if "/not-array" in paths:
            return Response('{"an": "object"}', content_type="application/json")
        answer = [_echo(item) for item in items if item["path"] != "/missing"]
        return Response(json.dumps(answer[::-1]), content_type="application/json")


def _echo(item: dict) -> dict:
    answer = {
        "correlation_id": item["correlation_id"],
        "status": 200,
        "headers": {"content-type": "text/plain", "x-item-path": item["path"]},
    }
    if item["path"].startswith("/big/"):
        answer["body"] = "b" * int(item["path"].split("/")[2])
    elif "body_base64" in item:
        answer["body_base64"] = item["body_base64"]
    else:
        answer["body"] = item["body"]
    return answer


@pytest.fixture(scope="module")
def batch_downstream():
    server = BatchDownstream()
    yield server
    server.server.shutdown()


@pytest.fixture(scope="module")
def gateway(stack):
    return stack.gateway()


def batch_worker(stack, service, url, *extra, **env):
    """A worker in batch mode for ``service``, batching to ``<url>/batch``."""
    env.setdefault("PROXYMQ_BATCH_URL", url + "/batch")
    env.setdefault("PROXYMQ_BATCH_SIZE", "4")
    return stack.worker(service, url, *extra, **env)


@pytest.fixture(scope="module")
def batched(stack, batch_downstream):
    """One batch-mode service (size 4, concurrency 1, window 2 s) shared by several tests."""
    service = unique_service("batch")
    batch_worker(stack, service, batch_downstream.url, PROXYMQ_BATCH_WAIT_MS="2000")
    yield service
    delete_queues(f"{service}_requests")


def post(gateway, service, path, body=b"", timeout=30, **headers):
    return requests.post(
        f"{gateway.url}/{service}{path}", data=body, headers=headers, timeout=timeout
    )


def concurrently(calls):
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def test_a_lone_request_on_an_idle_worker_does_not_wait_the_window(gateway, batched):
    post(gateway, batched, "/warm", b"warm")
    started = time.monotonic()
    response = post(gateway, batched, "/alone", b"alone")
    elapsed = time.monotonic() - started
    assert (response.status_code, response.content) == (200, b"alone")
    assert elapsed < 1.0  # the window is 2 s: half of it is room for a loaded machine


def test_concurrent_requests_go_in_batches_and_each_gets_its_own_answer(
    gateway, batched, batch_downstream
):
    before = len(batch_downstream.calls)
    bodies = [f"request {i} {uuid.uuid4().hex}".encode() for i in range(24)]
    calls = [lambda b=b: post(gateway, batched, "/slow/0.2", b) for b in bodies]
    responses = concurrently(calls)
    assert [r.status_code for r in responses] == [200] * 24
    assert [r.content for r in responses] == bodies
    assert all(r.headers["x-item-path"] == "/slow/0.2" for r in responses)
    sizes = batch_downstream.sizes()[before:]
    assert max(sizes) <= 4
    assert max(sizes) > 1, sizes  # under load, batches fill
    assert sum(sizes) == 24
    assert batch_downstream.max_in_flight == 1  # PROXYMQ_BATCH_CONCURRENCY defaults to 1


def test_items_carry_the_per_request_headers_and_the_call_the_nearest_deadline(
    gateway, batched, batch_downstream
):
    response = post(gateway, batched, "/h?a=1&a=2", b"x", **{"X-Custom": "yes"})
    cid = response.headers["X-Correlation-ID"]
    ((call, item),) = [
        (c, i) for c in batch_downstream.calls for i in c.items if i["correlation_id"] == cid
    ]
    assert call.headers["Content-Type"] == "application/json"
    assert (item["method"], item["path"], item["query"], item["body"]) == (
        "POST",
        "/h",
        "a=1&a=2",
        "x",
    )
    headers = item["headers"]
    assert headers["x-custom"] == "yes"
    assert headers["x-correlation-id"] == cid
    assert headers["x-proxymq-delivery-count"] == "1"
    deadlines = [int(i["headers"]["x-proxymq-deadline"]) for i in call.items]
    assert int(call.headers["X-Proxymq-Deadline"]) == min(deadlines)


def test_binary_and_empty_bodies_survive_a_batch(gateway, batched, batch_downstream):
    body = os.urandom(4096) + b"\xff\xfe"
    response = post(gateway, batched, "/bin", body)
    assert (response.status_code, response.content) == (200, body)
    cid = response.headers["X-Correlation-ID"]
    (item,) = [i for i in batch_downstream.items() if i["correlation_id"] == cid]
    assert base64.b64decode(item["body_base64"]) == body and "body" not in item
    empty = post(gateway, batched, "/empty")
    assert (empty.status_code, empty.content) == (200, b"")


def test_a_failed_batch_call_is_502_for_each_of_its_requests(gateway, batched):
    responses = concurrently([lambda: post(gateway, batched, "/fail-batch")] * 5)
    assert [r.status_code for r in responses] == [502] * 5
    assert {r.headers["X-ProxyMQ-Error"] for r in responses} == {"bad-batch-response"}
    assert {r.json()["error"] for r in responses} == {"bad-batch-response"}


def test_an_item_missing_from_the_answer_is_502_for_that_request_alone(
    gateway, batched, batch_downstream
):
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        slow = pool.submit(post, gateway, batched, "/slow/2", b"slow")
        wait_for(lambda: batch_downstream.in_flight == 1, 5, "the slow call in flight")
        missing = pool.submit(post, gateway, batched, "/missing", b"m")
        others = [pool.submit(post, gateway, batched, "/ok", f"{i}".encode()) for i in range(3)]
        assert slow.result().status_code == 200
        assert missing.result().status_code == 502
        assert missing.result().headers["X-ProxyMQ-Error"] == "bad-batch-response"
        assert [f.result().content for f in others] == [b"0", b"1", b"2"]
    missing_cid = missing.result().headers["X-Correlation-ID"]
    (call,) = [
        c for c in batch_downstream.calls if missing_cid in {i["correlation_id"] for i in c.items}
    ]
    assert len(call.items) > 1  # it shared its batch with requests that were answered


@pytest.mark.parametrize("path", ["/malformed", "/not-array"])
def test_a_malformed_answer_is_502_and_the_worker_survives(gateway, batched, path):
    response = post(gateway, batched, path)
    assert response.status_code == 502
    assert response.headers["X-ProxyMQ-Error"] == "bad-batch-response"
    after = post(gateway, batched, "/after", b"after")
    assert (after.status_code, after.content) == (200, b"after")


def test_two_batch_services_on_one_worker_never_share_a_batch(stack, gateway, batch_downstream):
    a, b = unique_service("ba"), unique_service("bb")
    config = stack.dir / "services.toml"
    config.write_text(
        "".join(
            f'[services.{name}]\ndownstream_url = "{batch_downstream.url}"\n'
            f'batch_url = "{batch_downstream.url}/batch/{name}"\nbatch_size = 8\n'
            for name in (a, b)
        )
    )
    queues = f"{a}_requests,{b}_requests"
    worker = stack.run(
        "worker",
        ["celery", "-A", "workers", "worker", "-Q", queues, "-n", f"two-{uuid.uuid4().hex[:6]}@%h"],
        PROXYMQ_CONFIG=str(config),
        PROXYMQ_WORKER_METRICS_PORT=str(free_port()),
    )
    wait_for(lambda: worker.alive() and consumers(f"{a}_requests") == 1, 30, "worker on a")
    wait_for(lambda: consumers(f"{b}_requests") == 1, 30, "worker on b")
    calls = [
        lambda s=s, i=i: post(gateway, s, f"/slow/0.1/{s}", f"{s} {i}".encode())
        for i in range(12)
        for s in (a, b)
    ]
    responses = concurrently(calls)
    assert [r.status_code for r in responses] == [200] * 24, worker.log()[-3000:]
    assert [r.content.decode().split()[0] for r in responses] == [a, b] * 12
    mine = [c for c in batch_downstream.calls if c.path in (f"/batch/{a}", f"/batch/{b}")]
    assert sum(len(c.items) for c in mine) == 24
    for call in mine:
        service = call.path.rsplit("/", 1)[1]
        assert {i["path"] for i in call.items} == {f"/slow/0.1/{service}"}
    delete_queues(f"{a}_requests", f"{b}_requests")


def test_a_worker_killed_with_its_batch_in_flight_loses_nothing(stack, gateway, batch_downstream):
    service = unique_service("bkill")
    victim = batch_worker(stack, service, batch_downstream.url)
    bodies = [f"kill {i}".encode() for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, gateway, service, "/slow/2", b, 60) for b in bodies]
        wait_for(
            lambda: (
                sum((i.get("body") or "").startswith("kill") for i in batch_downstream.items()) >= 1
            ),
            10,
            "a batch in flight",
        )
        victim.kill()
        batch_worker(stack, service, batch_downstream.url)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 6
    assert [r.content for r in responses] == bodies
    counts = {
        i["headers"]["x-proxymq-delivery-count"]
        for i in batch_downstream.items()
        if (i.get("body") or "").startswith("kill")
    }
    assert "2" in counts
    delete_queues(f"{service}_requests")


def test_batch_concurrency_two_allows_two_calls_but_no_more(stack, gateway):
    downstream = BatchDownstream()
    service = unique_service("bconc")
    batch_worker(
        stack, service, downstream.url, PROXYMQ_BATCH_CONCURRENCY="2", PROXYMQ_BATCH_SIZE="2"
    )
    responses = concurrently([lambda: post(gateway, service, "/slow/0.3", b"c")] * 12)
    assert [r.status_code for r in responses] == [200] * 12
    assert downstream.max_in_flight == 2
    downstream.server.shutdown()
    delete_queues(f"{service}_requests")


def test_a_reply_that_cannot_be_published_does_not_send_its_batch_back(stack, batch_downstream):
    # A raw publisher (not the gateway) can name a correlation id too long for an AMQP
    # property: that reply fails. Its batch-mates are answered once, 200, not requeued.
    service = unique_service("badreply")
    batch_worker(stack, service, batch_downstream.url, PROXYMQ_BATCH_WAIT_MS="1000")
    with kombu.Connection(BROKER_URL) as connection:
        channel = connection.default_channel
        replies, _, _ = channel.queue_declare("", exclusive=True)
        ids = []
        for index in range(3):
            envelope = RequestEnvelope(
                service=service,
                method="POST",
                path=f"/ok/{index}",
                query="",
                headers=[],
                body=b"%d" % index,
                deadline=int((time.time() + 30) * 1000),
            )
            correlation_id = "x" * 300 if index == 1 else str(uuid.uuid4())
            body, headers, properties = task_message(envelope, correlation_id, replies)
            if index == 1:
                del properties["correlation_id"]  # the id travels in the task headers only
            else:
                ids.append(correlation_id)
            message = amqp.Message(body, application_headers=headers, **properties)
            channel.basic_publish(message, exchange="", routing_key=f"{service}_requests")
        got = {}

        def answered() -> bool:
            while (message := channel.basic_get(replies, no_ack=True)) is not None:
                got[message.properties["correlation_id"]] = decode_reply(message.body)
            return set(ids) <= set(got)

        wait_for(answered, 20, "the answers of the good requests")
    assert {cid: got[cid].status for cid in ids} == {cid: 200 for cid in ids}
    counts = [
        item["headers"]["x-proxymq-delivery-count"]
        for item in batch_downstream.items()
        if item["correlation_id"] in ids
    ]
    assert counts == ["1", "1"]
    delete_queues(f"{service}_requests")


def test_the_example_fetcher_answers_batches_end_to_end(stack, gateway, downstream):
    fetcher_url = stack.fetcher()
    service = unique_service("fetch")
    batch_worker(stack, service, fetcher_url)
    target = downstream.url + "/sleep/0.2"
    calls = [lambda: post(gateway, service, "/fetch", json.dumps({"url": target}).encode())] * 8
    responses = concurrently(calls)
    assert [r.status_code for r in responses] == [200] * 8
    for response in responses:
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["status"] == 200
        assert response.json()["url"] == target
    delete_queues(f"{service}_requests")


def test_a_job_on_a_batch_service_is_stored_and_a_cancelled_one_skipped(stack, batch_downstream):
    result_url = "redis://127.0.0.1:6379/0"
    service = unique_service("batchjob")
    batch_worker(stack, service, batch_downstream.url, PROXYMQ_RESULT_URL=result_url).stop()
    gateway = stack.gateway(PROXYMQ_RESULT_URL=result_url)
    headers = {"Prefer": "respond-async"}
    cancelled = requests.post(f"{gateway.url}/{service}/ok", data=b"no", headers=headers)
    assert requests.delete(gateway.url + cancelled.headers["Location"]).status_code == 204
    accepted = requests.post(f"{gateway.url}/{service}/ok", data=b"stored", headers=headers)
    batch_worker(stack, service, batch_downstream.url, PROXYMQ_RESULT_URL=result_url)
    answer = poll_until_done(gateway, accepted.headers["Location"], 20)
    assert (answer.status_code, answer.content) == (200, b"stored")
    seen = {item["correlation_id"] for item in batch_downstream.items()}
    assert accepted.headers["X-Correlation-ID"] in seen
    assert cancelled.headers["X-Correlation-ID"] not in seen


def test_an_item_over_the_response_limit_is_502_for_it_alone(stack, gateway, batch_downstream):
    service = unique_service("batchbig")
    batch_worker(
        stack,
        service,
        batch_downstream.url,
        PROXYMQ_BATCH_WAIT_MS="1000",
        PROXYMQ_MAX_RESPONSE_BYTES="1000",
    )
    big, small = concurrently(
        [lambda: post(gateway, service, "/big/1500"), lambda: post(gateway, service, "/x", b"s")]
    )
    assert (big.status_code, big.headers["X-ProxyMQ-Error"]) == (502, "response-too-large")
    assert (small.status_code, small.content) == (200, b"s")
    # An answer larger than twice the batch's limits is not read at all.
    huge = post(gateway, service, "/big/100000")
    assert (huge.status_code, huge.headers["X-ProxyMQ-Error"]) == (502, "response-too-large")
    assert len([i for i in batch_downstream.items() if i["path"] == "/big/100000"]) == 1

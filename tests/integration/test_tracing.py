"""One trace from the client to the downstream and back, as the processes export it.

An OTLP/HTTP receiver in the test process (``POST /v1/traces``, protobuf) collects the
spans the real gateway, worker and fetcher export with the standard OpenTelemetry
variables; the tests read the traces back by correlation id.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import signal
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from support import delete_queues, free_port, queue_counts, unique_service, wait_for
from test_batching import BatchDownstream, batch_worker

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass
class Span:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict
    status: int  # 0 unset, 1 ok, 2 error
    links: list[tuple[str, str]]
    start: int
    end: int


def _value(any_value):
    field = any_value.WhichOneof("value")
    return getattr(any_value, field) if field else None


class Receiver:
    """An OTLP/HTTP trace receiver: every span posted to ``/v1/traces``."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                request = ExportTraceServiceRequest()
                request.ParseFromString(data)
                receiver.add(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        got = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    got.append(
                        Span(
                            service=resource.get("service.name", ""),
                            name=s.name,
                            kind=KINDS.get(s.kind, str(s.kind)),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status=s.status.code,
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            start=s.start_time_unix_nano,
                            end=s.end_time_unix_nano,
                        )
                    )
        with self.lock:
            self.spans.extend(got)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def of(self, correlation_id: str) -> list[Span]:
        """The spans of the trace(s) a correlation id's spans are in."""
        with self.lock:
            traces = {
                s.trace_id
                for s in self.spans
                if s.attributes.get("messaging.message.conversation_id") == correlation_id
            }
            return [s for s in self.spans if s.trace_id in traces]

    def wait(self, correlation_id: str, names: set[str], timeout: float = 15) -> list[Span]:
        def arrived():
            return names <= {s.name for s in self.of(correlation_id)}

        try:
            wait_for(arrived, timeout, f"spans {sorted(names)}")
        except TimeoutError:
            got = sorted((s.service, s.name) for s in self.of(correlation_id))
            raise AssertionError(f"spans missing: {sorted(names)}; got {got}") from None
        return self.of(correlation_id)


def otel_env(receiver: Receiver) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def gateway(stack, service, downstream, receiver):
    stack.worker(service, downstream.url, **otel_env(receiver))
    return stack.gateway(**otel_env(receiver))


def by_name(spans: list[Span]) -> dict[str, Span]:
    return {s.name: s for s in spans}


def traceparent(trace_id: str = CLIENT_TRACE, span_id: str = CLIENT_SPAN, flags: str = "01") -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def ids(header: str) -> tuple[str, str]:
    """A traceparent's trace id and parent id (its flags vary: sampled, random)."""
    _, trace_id, parent_id, _ = header.split("-")
    return trace_id, parent_id


def test_a_request_is_one_trace_that_continues_the_clients(gateway, service, downstream, receiver):
    response = requests.post(
        f"{gateway.url}/{service}/items/7",
        data=b"hello",
        headers={"traceparent": traceparent(), "tracestate": "vendor=1"},
    )
    assert response.status_code == 200
    cid = response.headers["X-Correlation-ID"]
    queue = f"{service}_requests"
    names = {
        f"POST /{service}",
        f"publish {queue}",
        f"queue wait {queue}",
        f"process {queue}",
        "POST",
    }
    spans = receiver.wait(cid, names)
    named = by_name([s for s in spans if not s.name.startswith("publish amq.")])
    assert {s.trace_id for s in spans} == {CLIENT_TRACE}
    server, publish = named[f"POST /{service}"], named[f"publish {queue}"]
    wait, process, call = named[f"queue wait {queue}"], named[f"process {queue}"], named["POST"]
    assert (server.service, server.kind, server.parent_id) == (
        "proxymq-gateway",
        "server",
        CLIENT_SPAN,
    )
    assert (publish.kind, publish.parent_id) == ("producer", server.span_id)
    assert (wait.service, wait.kind, wait.parent_id) == (
        "proxymq-worker",
        "consumer",
        publish.span_id,
    )
    assert (process.kind, process.parent_id) == ("consumer", publish.span_id)
    assert (call.kind, call.parent_id) == ("client", process.span_id)
    replies = [s for s in spans if s.kind == "producer" and s.service == "proxymq-worker"]
    assert [s.parent_id for s in replies] == [process.span_id]
    assert wait.start <= wait.end <= process.start + 1 and process.start <= call.start
    # semantic conventions
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["url.path"] == f"/{service}/items/7"
    assert server.attributes["http.response.status_code"] == 200
    for span in (publish, process, wait, *replies):
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.message.conversation_id"] == cid
    assert publish.attributes["messaging.destination.name"] == queue
    assert publish.attributes["messaging.operation.type"] == "publish"
    assert process.attributes["messaging.operation.type"] == "process"
    assert wait.attributes["messaging.operation.type"] == "receive"
    assert call.attributes["http.response.status_code"] == 200
    assert call.attributes["server.address"] == "127.0.0.1"
    # the downstream's traceparent: the worker's client span, the client's tracestate
    (seen,) = downstream.requests_for(cid)
    headers = {name.lower(): value for name, value in seen.headers}
    assert ids(headers["traceparent"]) == (CLIENT_TRACE, call.span_id)
    assert headers["tracestate"] == "vendor=1"


def test_without_a_traceparent_the_trace_starts_at_the_gateway(gateway, service, receiver):
    response = requests.get(f"{gateway.url}/{service}/fresh")
    cid = response.headers["X-Correlation-ID"]
    spans = receiver.wait(cid, {f"GET /{service}", "GET"})
    (server,) = [s for s in spans if s.kind == "server"]
    assert server.parent_id == "" and server.trace_id != CLIENT_TRACE
    assert len({s.trace_id for s in spans}) == 1


def test_errors_set_the_status_and_the_proxymq_error_code(gateway, service, receiver):
    response = requests.get(f"{gateway.url}/{service}/close")  # the downstream hangs up
    assert response.headers["X-ProxyMQ-Error"] == "downstream-unavailable"
    cid = response.headers["X-Correlation-ID"]
    queue = f"{service}_requests"
    named = by_name(receiver.wait(cid, {f"GET /{service}", f"process {queue}", "GET"}))
    for name in (f"GET /{service}", f"process {queue}", "GET"):
        assert named[name].status == 2, name
        assert named[name].attributes["proxymq.error.code"] == "downstream-unavailable", name
    # an error of the gateway's own: no worker, no queue
    missing = unique_service("nobody")
    response = requests.get(f"{gateway.url}/{missing}/x")
    assert response.headers["X-ProxyMQ-Error"] == "unknown-service"
    cid = response.headers["X-Correlation-ID"]
    named = by_name(receiver.wait(cid, {f"GET /{missing}", f"publish {missing}_requests"}))
    assert named[f"GET /{missing}"].status == 2
    assert named[f"GET /{missing}"].attributes["proxymq.error.code"] == "unknown-service"
    assert named[f"publish {missing}_requests"].status == 2


def test_a_redelivered_request_stays_in_its_trace(stack, gateway, downstream, receiver):
    service = unique_service("redeliver")
    worker = stack.worker(service, downstream.url, **otel_env(receiver))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            requests.post,
            f"{gateway.url}/{service}/sleep/1",
            data=b"x",
            headers={"traceparent": traceparent("ab" * 16)},
            timeout=60,
        )
        wait_for(lambda: any(s.raw_uri == "/sleep/1" for s in downstream.seen), 30, "call")
        worker.signal(signal.SIGKILL)
        worker.popen.wait(10)
        stack.worker(service, downstream.url, **otel_env(receiver))
        response = future.result()
    assert response.status_code == 200
    cid = response.headers["X-Correlation-ID"]
    queue = f"{service}_requests"
    spans = receiver.wait(cid, {f"process {queue}", "POST", f"POST /{service}"})
    assert {s.trace_id for s in spans} == {"ab" * 16}
    # The broker's redelivery is published again with its count (classic queues only
    # flag redeliveries), then processed: both in the client's trace.
    processes = [s for s in spans if s.name == f"process {queue}"]
    outcomes = sorted(
        (s.attributes["proxymq.delivery.count"], s.attributes["proxymq.outcome"]) for s in processes
    )
    assert outcomes == [(2, "published again"), (2, "replied")]
    calls = [s for s in downstream.seen if s.raw_uri == "/sleep/1"]
    assert [dict(s.headers)["Traceparent"].split("-")[1] for s in calls] == ["ab" * 16] * 2
    delete_queues(queue)


def test_a_batch_call_is_one_span_linked_to_every_items_trace(stack, gateway, receiver):
    downstream = BatchDownstream()
    service = unique_service("tbatch")
    batch_worker(stack, service, downstream.url, PROXYMQ_BATCH_WAIT_MS="300", **otel_env(receiver))
    queue = f"{service}_requests"
    trace_ids = [f"{n:032x}" for n in range(0xA1, 0xA5)]

    def send(trace_id):
        return requests.post(
            f"{gateway.url}/{service}/item",
            data=trace_id.encode(),
            headers={"traceparent": traceparent(trace_id)},
            timeout=30,
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(send, trace_ids))
    assert [r.status_code for r in responses] == [200] * 4
    # How the four are batched depends on timing (a lone request on an idle worker is
    # sent at once): every batch call is one span, linked to exactly its items' traces.
    assert sum(downstream.sizes()) == 4
    processes = {}
    for response, trace_id in zip(responses, trace_ids, strict=True):
        cid = response.headers["X-Correlation-ID"]
        spans = receiver.wait(cid, {f"process {queue}"})
        (process,) = [s for s in spans if s.name == f"process {queue}"]
        assert process.trace_id == trace_id
        processes[cid] = process
    name = f"POST batch {service}"
    count = len(downstream.calls)
    wait_for(
        lambda: len([s for s in receiver.spans if s.name == name]) == count, 15, "the batch spans"
    )
    batches = {s.span_id: s for s in receiver.spans if s.name == name}
    for call in downstream.calls:
        batch = batches[ids(call.headers["Traceparent"])[1]]
        assert batch.kind == "client" and batch.parent_id == ""
        items = [processes[item["correlation_id"]] for item in call.items]
        assert sorted(batch.links) == sorted((p.trace_id, p.span_id) for p in items)
        assert batch.attributes["proxymq.batch.size"] == len(call.items)
        for item, process in zip(call.items, items, strict=True):  # each its own trace
            assert ids(item["headers"]["traceparent"]) == (process.trace_id, process.span_id)
    delete_queues(queue)


def test_the_fetcher_continues_the_trace(stack, gateway, downstream, receiver):
    fetcher_url = stack.fetcher(**otel_env(receiver))
    service = unique_service("tfetch")
    stack.worker(service, fetcher_url, **otel_env(receiver))
    body = json.dumps({"url": downstream.url + "/hello"}).encode()
    response = requests.post(f"{gateway.url}/{service}/fetch", data=body, timeout=30)
    assert response.status_code == 200
    cid = response.headers["X-Correlation-ID"]
    # The worker's client span ("POST") is exported on its own schedule: wait for it too.
    spans = receiver.wait(cid, {"POST", "POST /fetch", "GET"})
    (call,) = [s for s in spans if s.service == "proxymq-worker" and s.kind == "client"]
    (server,) = [s for s in spans if s.service == "proxymq-fetcher" and s.kind == "server"]
    assert server.parent_id == call.span_id
    (fetch,) = [s for s in spans if s.service == "proxymq-fetcher" and s.kind == "client"]
    assert fetch.parent_id == server.span_id
    (seen,) = [s for s in downstream.seen if s.raw_uri == "/hello"]
    assert dict(seen.headers)["Traceparent"].split("-")[2] == fetch.span_id
    delete_queues(f"{service}_requests")


def test_log_lines_about_a_request_carry_its_ids(stack, gateway, service, receiver):
    response = requests.get(f"{gateway.url}/{service}/close")
    cid = response.headers["X-Correlation-ID"]
    spans = receiver.wait(cid, {"GET"})
    trace_id = spans[0].trace_id
    worker_log = next(p for p in stack.processes if p.args[0].endswith("celery"))
    wait_for(lambda: f"trace_id={trace_id}" in worker_log.log(), 10, "the worker's log line")
    line = next(line for line in worker_log.log().splitlines() if trace_id in line)
    assert f"correlation_id={cid}" in line and "failed" in line


FAULTS = Path(__file__).resolve().parent / "faults"


def _all_settled(queue: str) -> None:
    """Every message of ``queue`` acknowledged: none waits, none is held by a worker."""
    wait_for(lambda: queue_counts(queue) == (0, 0), 15, f"{queue} drained and acknowledged")


def _answered(gateway, service: str, count: int, **headers: str) -> list[int]:
    """``count`` requests at once (5 s each: an unanswered one is 504 soon); their statuses."""

    def send(number: int) -> int:
        return requests.post(
            f"{gateway.url}/{service}/echo/{number}",
            data=b"x",
            headers={"X-ProxyMQ-Timeout": "5", **headers},
            timeout=30,
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(send, range(count)))


def test_a_sampled_out_request_is_answered_and_acknowledged(gateway, service):
    # The client's sampled flag is off: the default sampler (parentbased_always_on)
    # follows it, and every span of the request is a non-recording one.
    unsampled = {"traceparent": traceparent("cd" * 16, flags="00")}
    assert _answered(gateway, service, 4, **unsampled) == [200] * 4
    _all_settled(f"{service}_requests")


def test_with_a_ratio_sampler_every_request_is_answered(stack, downstream, receiver):
    service = unique_service("ratio")
    env = {
        **otel_env(receiver),
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.5",
    }
    stack.worker(service, downstream.url, **env)
    gateway = stack.gateway(**env)
    assert _answered(gateway, service, 16) == [200] * 16
    _all_settled(f"{service}_requests")
    delete_queues(f"{service}_requests")


def test_observers_that_raise_cannot_stop_an_answer_or_an_ack(stack, gateway, downstream, receiver):
    # tests/integration/faults/sitecustomize.py makes the worker's task events, metrics
    # and spans raise on every call, in the worker process itself.
    service = unique_service("faults")
    worker = stack.worker(service, downstream.url, PYTHONPATH=str(FAULTS), **otel_env(receiver))
    wait_for(lambda: "observers raise" in worker.log(), 10, "the faults installed")
    sampled = {"traceparent": traceparent("ef" * 16)}
    assert _answered(gateway, service, 8, **sampled) == [200] * 8
    assert _answered(gateway, service, 8) == [200] * 8
    _all_settled(f"{service}_requests")
    assert "an observer failed" in worker.log()  # the faults really ran
    delete_queues(f"{service}_requests")

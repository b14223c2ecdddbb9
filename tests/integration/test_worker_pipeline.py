"""One way through the worker, seen from outside: what reaches the dead-letter queue,
the task events, node names, deadlines, Celery's remote control and ``-c``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field

import amqp
import kombu
import msgpack
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    BIN,
    BROKER_URL,
    ROOT,
    TaskEventsTap,
    base_env,
    consumers,
    delete_queues,
    free_port,
    queue_counts,
    unique_service,
    wait_for,
)
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from proxymq.envelope import RequestEnvelope, decode_reply, task_body


def _get_one(channel, queue: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while (message := channel.basic_get(queue, no_ack=True)) is None:
        assert time.monotonic() < deadline, f"nothing arrived in {queue}"
        time.sleep(0.05)
    return message


def _envelope(service: str, **changes) -> dict:
    wire = RequestEnvelope(
        service=service,
        method="POST",
        path="/echo",
        query="",
        headers=[],
        body=b"x",
        deadline=int((time.time() + 30) * 1000),
    ).to_wire()
    wire.update(changes)
    return wire


def _malformed(service: str) -> dict[str, tuple[bytes, dict, str]]:
    """Messages on a request queue that are no ProxyMQ request: (body, extra, reason)."""
    task = {"task": "proxymq.forward", "lang": "py"}
    missing = _envelope(service)
    del missing["deadline"]
    return {
        "undecodable": (b"\xc1\xc1 not msgpack", task, "not msgpack"),
        "another task name": (task_body([_envelope(service)]), {"task": "other.task"}, "unknown"),
        "arguments of another shape": (
            msgpack.packb([["broken", "x"], {"bogus": "x"}, {}], use_bin_type=True),
            task,
            "one request envelope",
        ),
        "a field missing": (task_body([missing]), task, "lacks deadline"),
        "a field of the wrong type": (
            task_body([_envelope(service, body="text, not bytes")]),
            task,
            "malformed body",
        ),
        "another service's request": (
            task_body([_envelope("someone_else")]),
            task,
            "a request for 'someone_else'",
        ),
        "no task header": (task_body([_envelope(service)]), {"lang": "py"}, "not a Celery task"),
    }


@pytest.fixture(scope="module")
def poison_service(stack, downstream):
    service = unique_service("malformed")
    stack.worker(service, downstream.url)
    return service


@pytest.mark.parametrize("case", list(_malformed("x")))
def test_a_malformed_message_is_dead_lettered_at_once_and_its_client_answered_poison(
    poison_service, downstream, case
):
    body, headers, reason = _malformed(poison_service)[case]
    correlation_id = f"bad-{uuid.uuid4().hex[:8]}"
    with kombu.Connection(BROKER_URL) as connection:
        channel = connection.channel()
        reply_queue, _, _ = channel.queue_declare("", exclusive=True)
        kombu.Producer(channel).publish(
            body,
            routing_key=f"{poison_service}_requests",
            content_type="application/x-msgpack",
            content_encoding="binary",
            headers={**headers, "id": correlation_id},
            correlation_id=correlation_id,
            reply_to=reply_queue,
        )
        reply = _get_one(channel, reply_queue)
        dead = _get_one(channel, f"{poison_service}_requests.dead")

    answer = decode_reply(reply.body)
    assert (answer.status, answer.error) == (502, "poison")
    assert reply.properties["correlation_id"] == correlation_id
    assert dead.body == body  # as it came
    assert dead.properties["correlation_id"] == correlation_id
    assert reason in dead.headers["x-proxymq-dead-reason"]
    assert consumers(f"{poison_service}_requests") == 1  # the worker lives on
    assert not downstream.requests_for(correlation_id)


# -- any malformed message, generated ----------------------------------------------------

# A body no worker can take: any bytes (invalid UTF-8 too), text that is not JSON, and
# JSON of the wrong shape (protocol-1 Celery messages among it: ``task`` in the body).
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_BODIES = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([b"", b"\xff\xfe\xc1 not UTF-8", b"\xed\xa0\x80", "caf\u00e9 {".encode()]),
    st.text(max_size=32).filter(lambda t: not _is_json(t)).map(str.encode),
    _json.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.just("task"), _json, min_size=1).map(lambda v: json.dumps(v).encode()),
)
_CONTENT_TYPES = [
    "application/json",
    "application/x-msgpack",
    "text/plain",
    None,
]
_ENCODINGS = ["utf-8", "binary", None, "no-such-encoding"]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Sent:
    """One malformed message as published: what its dead copy must still be."""

    body: bytes
    content_type: str | None
    content_encoding: str | None
    task_header: bool
    reply_to: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def publish(self, channel, queue: str, reply_queue: str) -> None:
        headers = {
            "x-test-id": self.id,
            **({"task": "proxymq.forward"} if self.task_header else {}),
        }
        properties = {
            "content_type": self.content_type,
            "content_encoding": self.content_encoding,
            "reply_to": reply_queue if self.reply_to else None,
        }
        message = amqp.Message(
            self.body,
            application_headers=headers,
            correlation_id=self.id,
            **{k: v for k, v in properties.items() if v is not None},
        )
        channel.basic_publish(message, routing_key=queue)


def _raw_channel(connection: kombu.Connection):
    """A channel that hands bodies over as the broker sent them: bytes, never decoded."""
    channel = connection.channel()
    channel.auto_decode = False
    return channel


def _drain(channel, queue: str, into: dict[str, object]) -> None:
    while (message := channel.basic_get(queue, no_ack=True)) is not None:
        key = (message.headers or {}).get("x-test-id") or message.properties.get("correlation_id")
        into[key] = message


@pytest.fixture(scope="module")
def raw_broker():
    with kombu.Connection(BROKER_URL) as connection:
        channel = _raw_channel(connection)
        reply_queue, _, _ = channel.queue_declare("", exclusive=True)
        yield channel, reply_queue


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=_BODIES,
    content_type=st.sampled_from(_CONTENT_TYPES),
    content_encoding=st.sampled_from(_ENCODINGS),
    task_header=st.booleans(),
    reply_to=st.booleans(),
)
def test_any_malformed_message_ends_in_the_dead_queue_as_it_came(
    poison_service, raw_broker, body, content_type, content_encoding, task_header, reply_to
):
    channel, reply_queue = raw_broker
    queue = f"{poison_service}_requests"
    sent = Sent(body, content_type, content_encoding, task_header, reply_to)
    sent.publish(channel, queue, reply_queue)
    dead: dict[str, object] = {}

    def arrived() -> bool:
        _drain(channel, queue + ".dead", dead)
        return sent.id in dead

    wait_for(arrived, 5, f"the dead copy of {sent}")
    copy = dead[sent.id]
    # As it came: bytes, whatever its declared encoding (py-amqp gives an empty body
    # as "", whatever the channel's decoding).
    assert (copy.body or b"") == body
    assert copy.properties.get("content_type") == content_type
    assert copy.properties.get("content_encoding") == content_encoding
    assert copy.properties["correlation_id"] == sent.id
    reason = copy.headers["x-proxymq-dead-reason"]
    assert isinstance(reason, str) and reason
    if reply_to:  # it names a reply queue and a correlation id: its client is told
        replies: dict[str, object] = {}
        wait_for(lambda: _drain(channel, reply_queue, replies) or sent.id in replies, 5, "reply")
        answer = decode_reply(replies[sent.id].body)
        assert (answer.status, answer.error) == (502, "poison")
    assert consumers(queue) == 1  # the worker lives on


def test_after_any_malformed_messages_the_queue_drains_and_requests_are_answered(stack, downstream):
    service = unique_service("drain")
    queue = f"{service}_requests"
    stack.worker(service, downstream.url)
    bodies = [b"\xff\xfe\xc1", b"not json {", b'{"task": [1]}', b"[1, 2]", b""]
    cases = [
        Sent(*case)
        for case in itertools.product(
            bodies, _CONTENT_TYPES, _ENCODINGS, (True, False), (True, False)
        )
    ]
    with kombu.Connection(BROKER_URL) as connection:
        channel = _raw_channel(connection)
        reply_queue, _, _ = channel.queue_declare("", exclusive=True)
        for sent in cases:
            sent.publish(channel, queue, reply_queue)
        # every one taken and acknowledged: none waits, none is held by the worker
        wait_for(lambda: queue_counts(queue) == (0, 0), 30, f"{queue} drained")
        dead: dict[str, object] = {}
        wait_for(
            lambda: _drain(channel, queue + ".dead", dead) or len(dead) == len(cases),
            10,
            "every dead copy",
        )
    assert {s.id: s.body for s in cases} == {key: m.body or b"" for key, m in dead.items()}
    gateway = stack.gateway()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda i: requests.post(
                    f"{gateway.url}/{service}/echo/{i}",
                    data=b"x",
                    headers={"X-ProxyMQ-Timeout": "10"},
                ),
                range(16),
            )
        )
    assert [r.status_code for r in responses] == [200] * 16
    delete_queues(queue, queue + ".dead")


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_single_and_batch_requests_send_the_same_task_events(stack, mode):
    service = unique_service(f"ev{mode}")
    batch = BatchEcho()
    env = {"PROXYMQ_BATCH_URL": batch.url + "/batch"} if mode == "batch" else {}
    with kombu.Connection(BROKER_URL) as connection, batch:
        tap = TaskEventsTap(connection)
        stack.worker(service, batch.url, **env)
        gateway = stack.gateway()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(
                    lambda i: requests.post(f"{gateway.url}/{service}/echo?n={i}", data=b"%d" % i),
                    range(16),
                )
            )
        ids = {r.headers["X-Correlation-ID"] for r in responses}
        assert [r.status_code for r in responses] == [200] * 16

        seen: dict[str, dict[str, dict]] = {}

        def every_request_finished() -> bool:
            for bunch in tap.bunches():
                for event in bunch:
                    if event.get("uuid") in ids:
                        seen.setdefault(event["uuid"], {})[event["type"]] = event
            return len(seen) == 16 and all("task-succeeded" in e for e in seen.values())

        wait_for(every_request_finished, 10, "task-succeeded for every request")

    for events_of_one in seen.values():
        assert set(events_of_one) == {"task-received", "task-started", "task-succeeded"}
        received = events_of_one["task-received"]
        assert received["name"] == "proxymq.forward"
        assert received["args"] == f"POST /{service}/echo"  # never the body or query
        assert events_of_one["task-succeeded"]["runtime"] >= 0
    if mode == "batch":
        assert batch.calls < 16  # they really went in batches


def test_workers_started_without_a_node_name_run_side_by_side(stack, downstream):
    first, second = unique_service("unnamed"), unique_service("unnamed")
    one = stack.worker(first, downstream.url, named=False)
    two = stack.worker(second, downstream.url, named=False)
    gateway = stack.gateway()

    for service in (first, second):
        assert requests.post(f"{gateway.url}/{service}/echo", data=b"hi").status_code == 200
    assert one.alive() and two.alive()
    assert "RESOURCE_LOCKED" not in one.log() + two.log()


def test_a_given_node_name_still_wins(stack, downstream):
    service = unique_service("named")
    node = f"mine-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    worker = stack.worker(service, downstream.url, "-n", node, named=False)
    assert worker.alive()
    assert _celery("inspect", "ping", "-d", node, timeout=15).returncode == 0


def test_a_call_cut_off_by_its_deadline_is_504_timeout_never_502(stack, downstream):
    service = unique_service("deadline")
    stack.worker(service, downstream.url)
    gateway = stack.gateway()

    def slow(_):
        return requests.post(
            f"{gateway.url}/{service}/sleep/2", data=b"x", headers={"X-ProxyMQ-Timeout": "0.5"}
        )

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(slow, range(24)))
    codes = {(r.status_code, r.headers.get("X-ProxyMQ-Error")) for r in responses}
    assert codes == {(504, "timeout")}


def _celery(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "celery"), "-A", "workers", *args],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_celery_remote_control_reaches_the_worker(stack, downstream):
    service = unique_service("control")
    queue = f"{service}_requests"
    node = f"ctl-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    worker = stack.worker(service, downstream.url, "-n", node, named=False)

    ping = _celery("inspect", "ping", "-d", node, "--json")
    assert ping.returncode == 0 and "pong" in ping.stdout
    stats = _celery("inspect", "stats", "-d", node, "--json")
    assert json.loads(stats.stdout)[node]["pool"]["max-concurrency"] == 64
    active = _celery("inspect", "active_queues", "-d", node, "--json")
    assert [q["name"] for q in json.loads(active.stdout)[node]] == [queue]

    assert _celery("control", "cancel_consumer", queue, "-d", node).returncode == 0
    wait_for(lambda: consumers(queue) == 0, 10, "the consumer cancelled")
    assert _celery("control", "add_consumer", queue, "-d", node).returncode == 0
    wait_for(lambda: consumers(queue) == 1, 10, "the consumer back")
    gateway = stack.gateway()
    assert requests.post(f"{gateway.url}/{service}/echo", data=b"hi").status_code == 200

    _celery("control", "shutdown", "-d", node)  # a node shutting down sends no reply
    worker.popen.wait(20)
    assert consumers(queue) == 0


def test_concurrency_flag_limits_downstream_calls_at_once(stack):
    service = unique_service("limit")
    with BatchEcho(delay=0.3) as slow:
        stack.worker(service, slow.url, "-c", "2")
        gateway = stack.gateway()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(
                    lambda i: requests.post(f"{gateway.url}/{service}/echo", data=b"x"), range(8)
                )
            )
    assert [r.status_code for r in responses] == [200] * 8
    assert slow.most_at_once == 2


class BatchEcho:
    """A downstream that echoes single calls and answers SPEC batch calls, counting calls
    and how many were in progress at once."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0
        self.most_at_once = 0
        self._now = 0
        self._lock = threading.Lock()
        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, self._app, threaded=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> BatchEcho:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()

    def _app(self, environ, start_response):
        request = Request(environ)
        with self._lock:
            self.calls += 1
            self._now += 1
            self.most_at_once = max(self.most_at_once, self._now)
        try:
            time.sleep(self.delay)
            if request.path == "/batch":
                items = json.loads(request.get_data())
                answer = [
                    {
                        "correlation_id": i["correlation_id"],
                        "status": 200,
                        "headers": {},
                        "body": i["body"],
                    }
                    for i in items
                ]
                return Response(json.dumps(answer), mimetype="application/json")(
                    environ, start_response
                )
            return Response(request.get_data())(environ, start_response)
        finally:
            with self._lock:
                self._now -= 1


@contextlib.contextmanager
def _worker_locked_out(stack, downstream, name: str):
    """A worker started while another connection holds a queue of its remote-control
    name, as a connection on a dying node does: 405 ``RESOURCE_LOCKED`` until the block
    ends and lets it go. Yields the worker, its service and its node name."""
    service = unique_service(name)
    node = f"{name}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    holder = kombu.Connection(BROKER_URL)
    holder.default_channel.queue_declare(f"{node}.celery.pidbox", exclusive=True)
    try:
        yield (
            stack.worker(service, downstream.url, "-n", node, named=False, wait=False),
            service,
            node,
        )
    finally:
        holder.release()


def test_a_queue_an_old_connection_still_holds_is_retried_not_fatal(stack, downstream):
    """During a cluster's rolling restart a worker reconnecting to another node got
    ``404 NOT_FOUND`` binding its remote-control queue (the broker was still removing the
    dead node's copy), or ``405 RESOURCE_LOCKED`` declaring it, and exited. Reproduced
    with the 405: another connection holds a queue of the worker's remote-control name
    until the test lets it go, as a connection on a dying node does."""
    with _worker_locked_out(stack, downstream, "chanerr") as (worker, service, node):
        wait_for(
            lambda: (
                "Unrecoverable error" in worker.log() or worker.log().count("RESOURCE_LOCKED") >= 4
            ),
            60,
            "the worker to retry its remote-control queue, or give up",
        )
        assert "Unrecoverable error" not in worker.log(), worker.log()[-3000:]
        assert worker.alive()
    wait_for(lambda: consumers(f"{service}_requests") == 1, 60, "the worker consuming")
    gateway = stack.gateway()
    assert requests.post(f"{gateway.url}/{service}/echo", data=b"hi").status_code == 200
    assert _celery("inspect", "ping", "-d", node).returncode == 0
    assert worker.alive()


def test_a_request_queue_declared_otherwise_still_stops_the_worker(stack, downstream):
    """Only a node going away is retried: a queue of the service's name with other
    arguments is a configuration to mend, and the worker says so and exits."""
    service = unique_service("otherargs")
    with kombu.Connection(BROKER_URL) as connection:
        connection.default_channel.queue_declare(f"{service}_requests", durable=False)
    try:
        worker = stack.worker(service, downstream.url, wait=False)
        assert worker.popen.wait(60) != 0
        assert "PRECONDITION_FAILED" in worker.log()
    finally:
        delete_queues(f"{service}_requests")


def test_a_channel_error_that_never_goes_away_does_not_spin_the_consumer(stack, downstream):
    """A 405 (or 404) that never clears - a queue of the worker's remote-control name held
    for good by another connection, a classic queue whose node is gone - restarts the
    consumer over and over. It must back off, not reconnect and log a traceback several
    times a second for as long as the worker lives."""
    with _worker_locked_out(stack, downstream, "chanloop") as (worker, _, _):
        wait_for(lambda: "RESOURCE_LOCKED" in worker.log(), 60, "the first 405")
        before = worker.log().count("RESOURCE_LOCKED")
        time.sleep(5)  # the rate is the feature: without the back-off, about 30 in 5 s
        assert worker.log().count("RESOURCE_LOCKED") - before <= 8, worker.log()[-3000:]


def test_an_exchange_deleted_under_the_worker_restarts_it_without_losing_or_repeating_calls(
    stack, downstream
):
    """An operator deletes Celery's ``celeryev`` exchange while a call is in flight. The
    next event publish gets 404, which now restarts the consumer. The connection is
    fine, yet Celery drops it (``on_connection_error_after_connected`` collects it)
    before ``ForwardStep`` settles the calls in flight: the broker redelivers the
    request and the restarted consumer makes the call again while the first still
    runs. Without the retry the worker exited, but settled its call first: one call."""
    service = unique_service("evdel")
    worker = stack.worker(service, downstream.url)
    gateway = stack.gateway()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(requests.post, f"{gateway.url}/{service}/sleep/4", data=b"a", timeout=60)
        wait_for(lambda: any("/sleep/4" in s.raw_uri for s in downstream.seen), 30, "the call")
        with kombu.Connection(BROKER_URL) as connection:
            connection.default_channel.exchange_delete("celeryev")
        fast = pool.submit(requests.post, f"{gateway.url}/{service}/echo", data=b"b", timeout=60)
        assert slow.result().status_code == 200
        assert fast.result().status_code == 200
    # Served by the restarted consumer, after any redelivery of the slow request.
    assert requests.post(f"{gateway.url}/{service}/echo", data=b"c", timeout=60).status_code == 200
    assert len([s for s in downstream.seen if "/sleep/4" in s.raw_uri]) == 1, worker.log()[-3000:]
    assert worker.alive(), worker.log()[-3000:]


def test_a_malformed_message_is_not_lost_when_its_dead_queue_was_deleted(stack, downstream):
    """An operator deletes ``<queue>.dead`` (say, after reading it) while the worker
    runs. A dead letter published to no queue was confirmed all the same, and the
    original acknowledged: lost. The worker declares the dead queue again, and the
    message ends there."""
    service = unique_service("deadgone")
    stack.worker(service, downstream.url)
    queue = f"{service}_requests"
    delete_queues(queue + ".dead")
    with kombu.Connection(BROKER_URL) as connection:
        channel = connection.default_channel
        channel.basic_publish(amqp.Message(b"\x00garbage", content_type="x/none"), "", queue)
    wait_for(lambda: queue_counts(queue + ".dead")[0] == 1, 30, "the dead letter")
    wait_for(lambda: queue_counts(queue) == (0, 0), 30, "the original settled")
    dead = _get_one(kombu.Connection(BROKER_URL).default_channel, queue + ".dead")
    assert dead.body == b"\x00garbage"


def test_a_worker_backing_off_a_channel_error_stops_promptly_on_sigterm(stack, downstream):
    """The back-off sleeps in the consumer's thread, up to 10 s: a warm shutdown must
    still end within about that."""
    with _worker_locked_out(stack, downstream, "chanterm") as (worker, _, _):
        wait_for(lambda: worker.log().count("RESOURCE_LOCKED") >= 5, 60, "a long backoff")
        started = time.monotonic()
        worker.popen.send_signal(15)
        worker.popen.wait(30)
        assert time.monotonic() - started < 12, worker.log()[-2000:]


def test_a_publish_id_header_of_a_hostile_request_does_not_break_the_worker(stack, downstream):
    """The confirm tracker tells a returned message by its ``x-proxymq-publish-id``
    header, and looks up every confirmed publish's header in a set. A request published
    again by the worker (``Verdict.AGAIN``: here a job reaching a worker without a result
    store; a classic queue's redelivery does the same) keeps the client's headers, and a
    client that can publish to the request queue can make that header a table: hashing it
    raises ``TypeError`` out of the broker's ack, in the consumer's event loop. The
    worker must go on serving (the header is only ever the worker's own string)."""
    service = unique_service("pubid")
    worker = stack.worker(service, downstream.url)
    queue = f"{service}_requests"
    task = {"task": "proxymq.forward", "lang": "py"}
    try:
        with kombu.Connection(BROKER_URL) as connection:
            channel = connection.channel()
            reply_queue, _, _ = channel.queue_declare("", exclusive=True)
            producer = kombu.Producer(channel)
            hostile = f"hostile-{uuid.uuid4().hex[:8]}"
            producer.publish(
                task_body([_envelope(service, job=True)]),
                routing_key=queue,
                content_type="application/x-msgpack",
                content_encoding="binary",
                headers={**task, "id": hostile, "x-proxymq-publish-id": {"a": 1}},
                correlation_id=hostile,
            )
            # No wait: the held job goes round through the queue, published again and
            # confirmed every few milliseconds, long before the honest call is answered.
            honest = f"honest-{uuid.uuid4().hex[:8]}"
            producer.publish(
                task_body([_envelope(service)]),
                routing_key=queue,
                content_type="application/x-msgpack",
                content_encoding="binary",
                headers={**task, "id": honest},
                correlation_id=honest,
                reply_to=reply_queue,
            )
            reply = None
            with contextlib.suppress(AssertionError):
                reply = _get_one(channel, reply_queue, timeout=15)
        assert reply is not None, worker.log()[-3000:]
        assert reply.properties["correlation_id"] == honest
        assert decode_reply(reply.body).status == 200
        assert "TypeError" not in worker.log(), worker.log()[-3000:]
        assert worker.alive(), worker.log()[-3000:]
    finally:
        delete_queues(queue, queue + ".dead")

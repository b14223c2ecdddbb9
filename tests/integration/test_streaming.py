"""Streamed answers end to end: a raw-socket downstream that streams, the real worker and
gateway, and clients that read slowly, stop reading or hang up (issue: streaming)."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import subprocess
import threading
import time
import uuid

import amqp
import kombu
import pytest
import requests
from support import (
    BROKER_URL,
    RawServer,
    broker_user,
    consumers,
    poll_until_done,
    unique_service,
    wait_for,
)

from proxymq.envelope import (
    ABORT,
    CHUNK,
    END,
    HEAD,
    ReplyEnvelope,
    RequestEnvelope,
    StreamPart,
    encode_reply,
    task_message,
)


class StreamingDownstream(RawServer):
    """Answers every request with ``text/event-stream`` (or plain chunked): ``events``
    events ``gap`` seconds apart, then the last chunk; ``events=0`` streams for ever.
    Records each call (its correlation id, its chunks sent) and when the worker closed
    the connection."""

    def __init__(self, events: int, gap: float, kind: str = "text/event-stream") -> None:
        self.events, self.gap, self.kind = events, gap, kind
        self.calls: list[dict] = []
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        request = conn.recv(65536).decode("latin-1")
        cid = next(
            (line.split(":", 1)[1].strip() for line in request.split("\r\n")
             if line.lower().startswith("x-correlation-id:")),
            None,
        )  # fmt: skip
        call = {"cid": cid, "sent": 0, "closed": None, "path": request.split(" ")[1]}
        self.calls.append(call)
        conn.sendall(
            f"HTTP/1.1 200 OK\r\nContent-Type: {self.kind}\r\n"
            "Transfer-Encoding: chunked\r\nX-Stream: yes\r\n\r\n".encode()
        )
        try:
            number = 0
            while self.events == 0 or number < self.events:
                event = f"data: event {number}\n\n".encode()
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                call["sent"] += 1
                number += 1
                # Wait the gap, but notice at once when the worker closes the connection.
                if select.select([conn], [], [], self.gap)[0] and not conn.recv(1, socket.MSG_PEEK):
                    raise ConnectionResetError("closed by the worker")
            conn.sendall(b"0\r\n\r\n")
            conn.settimeout(30)
            conn.recv(1)  # keep-alive: wait for the worker to close
        except OSError:
            pass
        call["closed"] = time.monotonic()
        conn.close()


def events_in(body: bytes) -> int:
    return body.count(b"data: event")


def read_raw(url: str, path: str, until: bytes | None = None, timeout: float = 20.0):
    """GET ``path`` on a raw socket; everything the gateway sends until it closes (or,
    with ``until``, until that appears). Returns the socket, the bytes, and for each
    recv (seconds since the request, events received by then)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
    started, data, arrivals = time.monotonic(), b"", []
    while until is None or until not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        arrivals.append((time.monotonic() - started, events_in(data)))
    return sock, data, arrivals


@pytest.fixture(scope="module")
def sse():
    return StreamingDownstream(events=10, gap=0.2)


@pytest.fixture(scope="module")
def streamed(stack, sse):
    service = unique_service("sse")
    stack.worker(service, sse.url)
    return service


@pytest.fixture(scope="module")
def gateway(stack, streamed):
    return stack.gateway(PROXYMQ_STREAM_IDLE_TIMEOUT="2")


def test_an_event_stream_reaches_the_client_event_by_event(gateway, streamed):
    sock, data, times = read_raw(gateway.url, f"/{streamed}/events")
    sock.close()
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Transfer-Encoding: chunked" in head and b"X-Stream: yes" in head
    assert b"X-Correlation-ID: " in head and b"Content-Length" not in head
    assert events_in(body) == 10 and body.endswith(b"0\r\n\r\n")  # a clean end
    # The first event came long before the last was even produced (the downstream waits
    # 0.2 s between its 10 events: 1.8 s between the first and the last, half is room).
    first = next(seconds for seconds, events in times if events >= 1)
    assert times[-1][0] - first > 0.9, times


def test_a_plain_chunked_answer_without_length_streams_too(stack):
    chunked = StreamingDownstream(events=5, gap=0.2, kind="application/octet-stream")
    service = unique_service("chunked")
    stack.worker(service, chunked.url)
    gateway = stack.gateway()
    with requests.get(f"{gateway.url}/{service}/x", stream=True, timeout=20) as response:
        started = time.monotonic()
        chunks = response.iter_content(chunk_size=None)
        first = next(chunks)
        arrived = time.monotonic() - started
        rest = b"".join(chunks)
        ended = time.monotonic() - started
    # The first chunk came before the rest was produced (4 gaps of 0.2 s; half is room).
    assert first.startswith(b"data: event 0") and ended - arrived > 0.4
    assert events_in(first + rest) == 5


class SizedEventStream(RawServer):
    """An event stream that declares its length: ``events`` events ``gap`` seconds apart,
    framed by the Content-Length alone, or chunked as well (framing that disagrees)."""

    def __init__(self, events: int, gap: float, chunked: bool) -> None:
        self.events, self.gap, self.chunked = events, gap, chunked
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        conn.recv(65536)
        events = [f"data: event {number}\n\n".encode() for number in range(self.events)]
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        head += f"Content-Length: {sum(map(len, events))}\r\n"
        head += "Transfer-Encoding: chunked\r\n" if self.chunked else ""
        conn.sendall(head.encode() + b"\r\n")
        with contextlib.suppress(OSError):
            for event in events:
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event) if self.chunked else event)
                time.sleep(self.gap)
            conn.sendall(b"0\r\n\r\n" if self.chunked else b"")
            conn.recv(1)  # keep-alive: wait for the worker to close
        conn.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "length-and-chunked"])
def test_an_event_stream_streams_whatever_its_framing(stack, chunked):
    """An event stream is one whatever its framing: its events reach the client as they
    come, with a Content-Length or without."""
    sized = SizedEventStream(events=5, gap=0.3, chunked=chunked)
    service = unique_service("sized")
    stack.worker(service, sized.url)
    gateway = stack.gateway()
    sock, data, times = read_raw(gateway.url, f"/{service}/events")
    sock.close()
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert events_in(body) == 5 and body.endswith(b"0\r\n\r\n")
    first = next(seconds for seconds, events in times if events >= 1)
    assert first < 0.9 and times[-1][0] > 1.2  # the first long before the last was sent


def test_a_client_that_hangs_up_cancels_the_downstream_call(stack):
    endless = StreamingDownstream(events=0, gap=0.1)
    service = unique_service("hangup")
    stack.worker(service, endless.url)
    gateway = stack.gateway()
    sock, _, _ = read_raw(gateway.url, f"/{service}/x", until=b"data: event 2")
    hung_up = time.monotonic()
    sock.close()
    (call,) = endless.calls
    # The downstream never ends on its own: its call closing at all is the cancel.
    wait_for(lambda: call["closed"] is not None, 10, "the downstream connection to close")
    assert call["closed"] > hung_up
    metrics = requests.get(gateway.url + "/metrics").text
    assert 'proxymq_gateway_streams_cancelled_total{reason="client-gone"} 1.0' in metrics


def test_a_stream_that_goes_quiet_is_cut_off_after_the_idle_timeout(stack):
    stalling = StreamingDownstream(events=0, gap=30)  # one event, then nothing
    service = unique_service("quiet")
    stack.worker(service, stalling.url, PROXYMQ_STREAM_IDLE_TIMEOUT="30")
    gateway = stack.gateway(PROXYMQ_STREAM_IDLE_TIMEOUT="1")
    started = time.monotonic()
    sock, data, _ = read_raw(gateway.url, f"/{service}/x")
    ended = time.monotonic()
    sock.close()
    assert events_in(data) == 1
    assert not data.endswith(b"0\r\n\r\n")  # cut off: no last chunk
    assert 0.9 < ended - started < 3
    (call,) = stalling.calls
    # Its next event is 30 s away (the worker's idle timeout too): closing now is the cancel.
    wait_for(lambda: call["closed"] is not None, 10, "the downstream connection to close")


def test_a_client_too_slow_for_its_buffer_is_cut_off_and_delays_nobody(stack):
    flood = StreamingDownstream(events=0, gap=0)  # as fast as it can
    service = unique_service("flood")
    stack.worker(service, flood.url)
    gateway = stack.gateway(PROXYMQ_STREAM_BUFFER_BYTES="65536")
    host, port = gateway.url.removeprefix("http://").split(":")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect((host, int(port)))
    slow.sendall(f"GET /{service}/x HTTP/1.1\r\nHost: a\r\n\r\n".encode())  # and never read
    (call,) = [c for c in _wait_calls(flood, 1)]
    for _ in range(5):  # the same process answers others meanwhile (a blocked one would
        # not answer at all: the timeout is that bound, with room)
        assert requests.get(gateway.url + "/healthz", timeout=5).status_code == 200
    wait_for(lambda: call["closed"] is not None, 10, "the stream to be cancelled")
    metrics = requests.get(gateway.url + "/metrics").text
    assert 'proxymq_gateway_streams_cancelled_total{reason="overflow"} 1.0' in metrics
    slow.close()


def _wait_calls(downstream: StreamingDownstream, count: int) -> list[dict]:
    wait_for(lambda: len(downstream.calls) >= count, 10, "the downstream call")
    return downstream.calls


def test_a_worker_killed_mid_stream_cuts_the_answer_off_and_nothing_is_spliced_in(stack):
    endless = StreamingDownstream(events=0, gap=0.1)
    service = unique_service("killed")
    victim = stack.worker(service, endless.url)
    gateway = stack.gateway(PROXYMQ_STREAM_IDLE_TIMEOUT="2")
    sock = None
    try:
        sock, data, _ = read_raw(gateway.url, f"/{service}/x", until=b"data: event 3")
        victim.signal(signal.SIGKILL)
        queue = f"{service}_requests"
        wait_for(lambda: consumers(queue) == 0, 10, "the killed worker's consumer to go")
        stack.worker(service, endless.url)  # a second worker: no redelivery must reach it
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        if sock is not None:
            sock.close()
    assert not data.endswith(b"0\r\n\r\n")
    body = data.split(b"\r\n\r\n", 1)[1]
    numbers = [int(line.split()[-1]) for line in body.split(b"\n") if b"data: event" in line]
    assert numbers == list(range(len(numbers)))  # one copy, in order, no restart at 0
    time.sleep(1)
    assert len(endless.calls) == 1  # acknowledged with its head: never delivered again


def test_a_worker_killed_mid_stream_ends_the_answer_long_before_the_idle_timeout(stack):
    """A worker killed outright sends no abort: the gateway notices its cancel queue
    (exclusive to the worker's connection) is gone, and cuts the answer off then,
    not after the idle timeout's 60 s of silence."""
    endless = StreamingDownstream(events=0, gap=0.1)
    service = unique_service("gone")
    victim = stack.worker(service, endless.url)
    gateway = stack.gateway(PROXYMQ_STREAM_IDLE_TIMEOUT="60")
    sock, data, _ = read_raw(gateway.url, f"/{service}/x", until=b"data: event 2")
    try:
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        sock.settimeout(30)  # half the idle timeout: past it, the watch did not work
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                data += chunk
        ended = time.monotonic() - killed
    finally:
        sock.close()
    assert ended < 10, ended  # two probes 2 s apart and a grace, with room
    assert not data.endswith(b"0\r\n\r\n")  # cut off, not ended
    metrics = requests.get(gateway.url + "/metrics").text
    assert 'proxymq_gateway_streams_cancelled_total{reason="worker-gone"} 1.0' in metrics


def test_the_gateways_worker_probes_are_quiet_on_the_worker(stack):
    """The probes come every 2 s per streaming worker: a worker whose
    PROXYMQ_CANCEL_USERS does not name the gateway's user still says nothing of them."""
    endless = StreamingDownstream(events=0, gap=0.1)
    service = unique_service("probed")
    worker = stack.worker(service, endless.url, PROXYMQ_CANCEL_USERS="someone-else")
    gateway = stack.gateway(PROXYMQ_STREAM_IDLE_TIMEOUT="60")
    # 50 events 0.1 s apart: two probes at least (2 s apart) went to the worker meanwhile.
    sock, _, _ = read_raw(gateway.url, f"/{service}/x", until=b"data: event 50")
    try:
        assert "dropped a cancel" not in worker.log()  # (before the hang-up's own cancel)
    finally:
        sock.close()


def test_a_job_stores_the_whole_streamed_answer(stack):
    sse = StreamingDownstream(events=3, gap=0.05)
    service = unique_service("jobsse")
    result_url = "redis://127.0.0.1:6379/0"
    stack.worker(service, sse.url, PROXYMQ_RESULT_URL=result_url)
    gateway = stack.gateway(PROXYMQ_RESULT_URL=result_url)
    accepted = requests.post(
        f"{gateway.url}/{service}/x", headers={"Prefer": "respond-async"}, timeout=10
    )
    answer = poll_until_done(gateway, accepted.headers["Location"], 10)
    assert answer.status_code == 200 and events_in(answer.content) == 3
    assert uuid.UUID(accepted.headers["X-Correlation-ID"])


# -- the parts' order, and who may cancel ---------------------------------------------------


class FakeWorker:
    """Plays a worker on ``service``'s queue, through the broker as guest (the user the
    gateway is told to accept replies from): takes a request, then publishes the parts it
    is told to, straight to the gateway's reply queue."""

    def __init__(self, service: str) -> None:
        self.queue = f"{service}_requests"
        self.connection = kombu.Connection(BROKER_URL)
        self.channel = self.connection.channel()
        self.channel.queue_declare(self.queue, auto_delete=False)
        self.cancels = f"proxymq.cancel.{uuid.uuid4().hex}"  # the cancels the gateway sends
        self.channel.queue_declare(self.cancels, exclusive=True)
        self.stream_id = uuid.uuid4().hex
        self.reply_to = self.correlation_id = None

    def take(self) -> None:
        got = []
        wait_for(lambda: got.append(self.channel.basic_get(self.queue, no_ack=True)) or got[-1],
                 10, "the request")  # fmt: skip
        self.reply_to = got[-1].properties["reply_to"]
        self.correlation_id = got[-1].properties["correlation_id"]

    def part(self, kind: str, seq: int, body: bytes = b"") -> None:
        headers = StreamPart(kind, self.stream_id, seq, self.cancels if kind == HEAD else "")
        if kind == HEAD:
            body = encode_reply(ReplyEnvelope(200, [("Content-Type", "text/event-stream")]))
        message = amqp.Message(
            body,
            correlation_id=self.correlation_id,
            user_id="guest",
            application_headers=headers.headers(),
        )
        self.channel.basic_publish(message, routing_key=self.reply_to)

    def cancel_received(self):
        """The next cancel; the gateway's probes (naming no stream) are passed over, as
        a worker does."""
        while (message := self.channel.basic_get(self.cancels, no_ack=True)) is not None:
            if "x-proxymq-stream-id" in (message.properties.get("application_headers") or {}):
                return message
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.queue_delete(self.queue)
        self.connection.close()


@pytest.fixture
def fake():
    worker = FakeWorker(unique_service("fake"))
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def checked_gateway(stack):
    return stack.gateway(PROXYMQ_REPLY_USERS="guest", PROXYMQ_STREAM_IDLE_TIMEOUT="10")


def stream_through(gateway, fake: FakeWorker, parts: list[tuple[str, int, bytes]]):
    """A client reading ``fake``'s stream while it publishes ``parts`` after the head;
    what the client got, and how long after the last part its answer ended."""
    service = fake.queue.removesuffix("_requests")
    got: dict = {}
    client = threading.Thread(
        target=lambda: got.update(data=read_raw(gateway.url, f"/{service}/x")[1])
    )
    client.start()
    fake.take()
    fake.part(HEAD, 0)
    for kind, seq, body in parts:
        fake.part(kind, seq, body)
    published = time.monotonic()
    client.join(20)
    return got["data"], time.monotonic() - published


def event(number: int) -> bytes:
    return f"data: event {number}\n\n".encode()


@pytest.mark.parametrize(
    "order",
    [[1, 3, 2, 4], [2, 1, 3, 4], [1, 2, 4]],
    ids=["overtaken", "first-overtaken", "lost"],
)
def test_a_part_lost_or_out_of_order_cuts_the_stream_off_never_spliced(
    checked_gateway, fake, order
):
    parts = [(CHUNK if seq < 4 else END, seq, event(seq) if seq < 4 else b"") for seq in order]
    data, after = stream_through(checked_gateway, fake, parts)
    assert data.startswith(b"HTTP/1.1 200")
    body = data.split(b"\r\n\r\n", 1)[1]
    assert not body.endswith(b"0\r\n\r\n")  # cut off, no clean end
    good = order[: next(i for i, seq in enumerate(order) if seq != i + 1)]
    numbers = [int(line.split()[-1]) for line in body.split(b"\n") if b"data: event" in line]
    assert numbers == good  # what came in order, then nothing
    assert after < 3  # at once, not at the idle timeout
    # The worker is told to stop: as the gateway's broker user, naming the stream.
    wait_for(lambda: fake.cancel_received() is not None or None, 5, "the cancel")


@pytest.mark.parametrize(
    "parts",
    [
        [(CHUNK, None, event(1)), (CHUNK, 1, event(2)), (END, 2, b"")],
        [(CHUNK, 1, event(1)), (CHUNK, None, event(9)), (CHUNK, 2, event(2)), (END, 3, b"")],
        [(CHUNK, 1, event(1)), (END, None, b"")],
    ],
    ids=["first", "between", "end"],
)
def test_a_part_without_a_number_in_a_numbered_stream_cuts_it_off_never_spliced(
    checked_gateway, fake, parts
):
    """A stream whose head is numbered numbers every part: one without a number did not
    come from that stream's count (another publisher's, or a copy), so it is neither
    written out nor allowed to end the stream cleanly."""
    data, after = stream_through(checked_gateway, fake, parts)
    body = data.split(b"\r\n\r\n", 1)[1]
    assert not body.endswith(b"0\r\n\r\n")  # cut off, no clean end
    numbers = [int(line.split()[-1]) for line in body.split(b"\n") if b"data: event" in line]
    good = [int(b.split()[-1]) for _, _, b in parts[: [p[1] for p in parts].index(None)]]
    assert numbers == good  # what came numbered, then nothing
    assert after < 3  # at once, not at the idle timeout
    wait_for(lambda: fake.cancel_received() is not None or None, 5, "the cancel")


def test_parts_in_order_end_cleanly(checked_gateway, fake):
    parts = [(CHUNK, 1, event(1)), (CHUNK, 2, event(2)), (END, 3, b"")]
    data, _ = stream_through(checked_gateway, fake, parts)
    assert data.endswith(b"0\r\n\r\n") and events_in(data) == 2
    assert fake.cancel_received() is None


def test_the_gateways_cancel_names_its_user_and_the_stream(checked_gateway, fake):
    stream_through(checked_gateway, fake, [(CHUNK, 2, event(2))])
    cancels = []
    wait_for(lambda: cancels.append(fake.cancel_received()) or cancels[-1], 5, "the cancel")
    cancel = cancels[-1]
    assert cancel.properties["user_id"] == "guest"
    assert cancel.properties["correlation_id"] == fake.correlation_id
    assert cancel.properties["application_headers"] == {"x-proxymq-stream-id": fake.stream_id}


def test_a_part_of_an_unknown_kind_ends_the_stream_as_other_never_a_new_label(
    checked_gateway, fake
):
    kind = f"x-{uuid.uuid4().hex}"
    data, _ = stream_through(checked_gateway, fake, [(CHUNK, 1, event(1)), (kind, 2, b"")])
    assert events_in(data) == 1 and not data.split(b"\r\n\r\n", 1)[1].endswith(b"0\r\n\r\n")
    metrics = requests.get(checked_gateway.url + "/metrics").text
    assert kind not in metrics
    assert 'proxymq_gateway_streams_cancelled_total{reason="other"}' in metrics


def broker_connections_of(pid: int) -> list[str]:
    """RabbitMQ's ids of the AMQP connections process ``pid`` holds."""
    sockets = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=True)
    ports = {
        line.split()[3].rsplit(":", 1)[1]
        for line in sockets.stdout.splitlines()
        if f"pid={pid}," in line and line.split()[4].endswith(":5672")
    }
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "peer_port", "--no-table-headers"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.split()[0] for line in listed.stdout.splitlines() if line.split()[-1:][0] in ports]


def test_a_stream_its_worker_stops_ends_the_clients_answer_at_once(stack):
    endless = StreamingDownstream(events=0, gap=0.1)
    service = unique_service("stopped")
    worker = stack.worker(service, endless.url)
    gateway = stack.gateway(PROXYMQ_STREAM_IDLE_TIMEOUT="15")
    sock, data, _ = read_raw(gateway.url, f"/{service}/x", until=b"data: event 2")
    try:
        # The broker drops the worker's connections (a node restart, a network blip): the
        # worker cancels what it relays, as it cannot publish the rest on that connection.
        names = broker_connections_of(worker.pid)
        assert names
        cut = time.monotonic()
        for name in names:
            subprocess.run(["rabbitmqctl", "-q", "close_connection", name, "test"], check=True)
        sock.settimeout(30)
        while chunk := sock.recv(65536):
            data += chunk
            assert time.monotonic() - cut < 30, "the stream goes on"
        ended = time.monotonic() - cut
    finally:
        sock.close()
    assert not data.endswith(b"0\r\n\r\n")  # cut off, not ended
    assert ended < 5, ended  # at the worker's abort, not at the 15 s idle timeout


@pytest.fixture
def intruder():
    """Another broker user, and a channel of its own."""
    with broker_user() as (name, url), kombu.Connection(url) as connection:
        yield name, connection.channel()


class FakeGateway:
    """Plays a gateway as guest: publishes a request to a real worker's queue with its
    own reply queue, and reads the streamed parts as they come."""

    def __init__(self, service: str) -> None:
        self.connection = kombu.Connection(BROKER_URL)
        self.channel = self.connection.channel()
        self.reply_to = self.channel.queue_declare("", exclusive=True).queue
        self.correlation_id = str(uuid.uuid4())
        deadline = int((time.time() + 60) * 1000)
        request = RequestEnvelope(service, "GET", "/x", None, [], b"", deadline)
        body, headers, properties = task_message(request, self.correlation_id, self.reply_to)
        message = amqp.Message(body, application_headers=headers, **properties)
        self.channel.basic_publish(message, routing_key=f"{service}_requests")
        self.head = self.next_part()
        assert (self.head.kind, self.head.seq) == (HEAD, 0)

    def next_part(self, timeout: float = 10) -> StreamPart:
        got = []
        wait_for(lambda: got.append(self.channel.basic_get(self.reply_to, no_ack=True)) or got[-1],
                 timeout, "a part")  # fmt: skip
        return StreamPart.of(got[-1].properties["application_headers"])

    def cancel(self, channel, stream_id: str | None, user_id: str | None) -> None:
        """Publish a cancel for this stream to its worker's cancel queue on ``channel``."""
        headers = {"x-proxymq-stream-id": stream_id} if stream_id else {}
        extra = {"user_id": user_id} if user_id else {}
        message = amqp.Message(
            b"", correlation_id=self.correlation_id, application_headers=headers, **extra
        )
        channel.basic_publish(message, routing_key=self.head.cancel_to)

    def close(self) -> None:
        self.connection.close()


def parts_go_on(fake: FakeGateway, count: int) -> list[StreamPart]:
    return [fake.next_part(timeout=3) for _ in range(count)]


def test_a_cancel_from_another_broker_user_does_not_stop_a_stream(stack, intruder):
    """What such a user can learn (the worker's cancel queue, from the queue list; the
    correlation id, from a request queue) is not enough: a cancel must name the stream,
    which only the gateway's reply queue ever sees."""
    name, channel = intruder
    endless = StreamingDownstream(events=0, gap=0.05)
    service = unique_service("forged")
    stack.worker(service, endless.url)
    fake = FakeGateway(service)
    try:
        parts_go_on(fake, 2)
        fake.cancel(channel, None, None)
        fake.cancel(channel, None, name)
        fake.cancel(channel, uuid.uuid4().hex, name)  # a guess
        later = parts_go_on(fake, 10)  # half a second: long after the cancels arrived
        assert [p.kind for p in later] == [CHUNK] * 10
        (call,) = endless.calls
        assert call["closed"] is None
    finally:
        fake.close()


def test_with_cancel_users_only_they_can_cancel_and_a_cancel_ends_with_an_abort(stack, intruder):
    name, channel = intruder
    endless = StreamingDownstream(events=0, gap=0.05)
    service = unique_service("cancel")
    stack.worker(service, endless.url, PROXYMQ_CANCEL_USERS="guest")
    fake = FakeGateway(service)
    try:
        parts = parts_go_on(fake, 2)
        # Even knowing the stream id, another user's cancel is dropped (and logged).
        fake.cancel(channel, fake.head.stream_id, name)
        parts += parts_go_on(fake, 10)
        assert [p.kind for p in parts] == [CHUNK] * 12
        (call,) = endless.calls
        assert call["closed"] is None
        # The gateway's own: the downstream call stops, and the stream ends with an abort
        # numbered after the last chunk, so its client is not left waiting.
        fake.cancel(fake.channel, fake.head.stream_id, "guest")
        cancelled = time.monotonic()
        while parts[-1].kind == CHUNK:
            parts.append(fake.next_part(timeout=3))
        assert parts[-1].kind == ABORT
        assert [p.seq for p in parts] == list(range(1, len(parts) + 1))
        assert {p.stream_id for p in parts} == {fake.head.stream_id}
        wait_for(lambda: call["closed"] is not None, 5, "the downstream connection to close")
        assert call["closed"] - cancelled < 1.0
    finally:
        fake.close()

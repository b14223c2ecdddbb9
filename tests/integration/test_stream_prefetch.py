"""A worker relaying a stream takes no request it has no call thread for (issue 21).

A stream's request is acknowledged when its head is confirmed, while its call thread goes
on relaying; the prefetch goes down by one for as long (``workers.prefetch``), and a
worker whose every call thread relays a stream stops consuming until one ends. Real
processes: two or one ``-c`` limited workers, the gateway, a downstream that streams on
``/stream`` and answers anything else after ``work`` seconds."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import kombu
import pytest
import requests
from celery import Celery
from support import BROKER_URL, RawServer, consumers, unique_service, wait_for
from test_streaming import events_in, read_raw

QUEUE = "{}_requests"


class StreamsAndWork(RawServer):
    """``/stream``: an event every ``gap`` seconds, ``events`` of them (0: until the
    worker closes the connection); any other path: 200 after ``work`` seconds. Records
    the paths it was asked for, in order."""

    def __init__(self, work: float, events: int = 0, gap: float = 0.25) -> None:
        self.work, self.events, self.gap = work, events, gap
        self.paths: list[str] = []
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        path = conn.recv(65536).decode("latin-1").split(" ")[1]
        self.paths.append(path)
        try:
            if path.startswith("/stream"):
                self._stream(conn)
            else:
                time.sleep(self.work)
                body = f"done {path}".encode()
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
                conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
        except OSError:
            pass
        conn.close()

    def _stream(self, conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        number = 0
        while self.events == 0 or number < self.events:
            event = f"data: event {number}\n\n".encode()
            conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            number += 1
            time.sleep(self.gap)
        conn.sendall(b"0\r\n\r\n")


def ready(queue: str) -> int:
    """Messages waiting in ``queue`` (delivered to no worker)."""
    with kombu.Connection(BROKER_URL) as connection:
        return connection.default_channel.queue_declare(queue, passive=True).message_count


def _ctl(*args: str) -> list[list[str]]:
    ctl = ["rabbitmqctl", "-q", "--no-table-headers", *args]
    listed = subprocess.run(ctl, capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in listed.splitlines()]


def consuming_channel(queue: str) -> str | None:
    """The pid of the one channel consuming ``queue``; None when none is listed (a
    loaded broker may leave out a queue that did not answer the listing in time: seen
    once in CI, mid-stream, with nothing in the worker's log)."""
    pids = {
        row[1] for row in _ctl("list_consumers", "queue_name", "channel_pid") if row[0] == queue
    }
    if not pids:
        return None
    (pid,) = pids
    return pid


def channel_prefetch(queue: str) -> int | None:
    """The prefetch of the channel consuming ``queue`` (Celery sets it per channel,
    ``global``, on classic queues), as RabbitMQ reports it; None while none is listed."""
    pid = consuming_channel(queue)
    if pid is None:
        return None
    (count,) = [
        row[1] for row in _ctl("list_channels", "pid", "global_prefetch_count") if row[0] == pid
    ]
    return int(count)


def close_connection_of(queue: str) -> None:
    """Have the broker close the connection of the worker consuming ``queue``."""
    pid = consuming_channel(queue)
    (connection,) = [row[1] for row in _ctl("list_channels", "pid", "connection") if row[0] == pid]
    subprocess.run(
        ["rabbitmqctl", "-q", "close_connection", connection, "test: a lost connection"],
        check=True, capture_output=True,
    )  # fmt: skip


def test_a_worker_relaying_a_stream_takes_no_request_it_cannot_start(stack):
    """Two workers with one call thread each; one relays a stream that lasts. Four
    2 s requests, each with 12 s to go: the idle worker answers them one after the
    other (8 s). One taken by the streaming worker would wait for the stream (504)."""
    downstream = StreamsAndWork(work=2.0)
    service = unique_service("prefetch")
    stack.worker(service, downstream.url, "-c", "1")
    stack.worker(service, downstream.url, "-c", "1")
    gateway = stack.gateway()
    stream, _, _ = read_raw(gateway.url, f"/{service}/stream", until=b"data: event 1")
    try:

        def get(number: int) -> int:
            url = f"{gateway.url}/{service}/work/{number}"
            return requests.get(url, headers={"X-ProxyMQ-Timeout": "12"}, timeout=30).status_code

        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(get, range(4)))
        took = time.monotonic() - started
        assert statuses == [200] * 4, (statuses, round(took, 1))
        assert stream.recv(65536)  # the stream still runs: the requests went round it
    finally:
        stream.close()
    assert sorted(p for p in downstream.paths if p.startswith("/work")) == [
        f"/work/{n}" for n in range(4)
    ]


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_after_its_stream_ends_the_worker_takes_requests_again(stack, queue_type):
    """One worker, one call thread: while it relays a stream a request waits in the
    queue (not behind the stream in the worker); when the stream ends, the worker
    consumes again and answers it, and so for a second stream. Quorum queues too (their
    per-consumer prefetch cannot be lowered, but consuming stops all the same)."""
    downstream = StreamsAndWork(work=0.1, events=20, gap=0.25)
    service = unique_service("resume")
    queue = QUEUE.format(service)
    stack.worker(service, downstream.url, "-c", "1", PROXYMQ_QUEUE_TYPE=queue_type)
    gateway = stack.gateway()
    for _ in range(2):
        streamed: list[bytes] = []
        answers: list[requests.Response] = []
        relay = threading.Thread(target=_read_stream, args=(gateway.url, service, streamed))
        relay.start()
        wait_for(lambda: consumers(queue) == 0, 10, "the worker to stop consuming")
        asked = threading.Thread(target=_get, args=(f"{gateway.url}/{service}/w", answers))
        asked.start()
        wait_for(lambda: ready(queue) == 1, 10, "the request to wait in the queue")
        assert not streamed  # it waited while the stream ran
        relay.join(30)
        asked.join(30)
        assert events_in(streamed[0]) == 20 and streamed[0].endswith(b"0\r\n\r\n")
        assert answers[0].status_code == 200 and answers[0].text == "done /w"
        assert consumers(queue) == 1


def _read_stream(gateway_url: str, service: str, into: list[bytes]) -> None:
    into.append(read_raw(gateway_url, f"/{service}/stream")[1])


def _get(url: str, into: list[requests.Response]) -> None:
    into.append(requests.get(url, timeout=30))


@pytest.fixture(scope="module")
def with_batches(stack, tmp_path_factory):
    """A worker with three call threads that serves a service that streams and a batch
    service (2 x (3 + 2) extra prefetch): its prefetch is 13. Yields the streaming
    service and the gateway."""
    downstream = StreamsAndWork(work=0.1)
    streamed, batched = unique_service("pfs"), unique_service("pfb")
    config = tmp_path_factory.mktemp("prefetch") / "services.toml"
    config.write_text(
        f'[services.{streamed}]\ndownstream_url = "{downstream.url}"\n'
        f'[services.{batched}]\ndownstream_url = "{downstream.url}"\n'
        f'batch_url = "{downstream.url}/batch"\nbatch_size = 2\nbatch_concurrency = 3\n'
    )
    queue = QUEUE.format(streamed)
    stack.run(
        "worker",
        ["celery", "-A", "workers", "worker", "-Q", f"{queue},{QUEUE.format(batched)}",
         "-c", "3", "-n", f"{streamed}@%h", "--without-mingle", "--without-gossip"],
        PROXYMQ_CONFIG=str(config),
    )  # fmt: skip
    wait_for(lambda: consumers(queue) == 1, 30, "the worker")
    return streamed, stack.gateway()


def test_the_prefetch_goes_down_by_one_for_a_stream_and_back_when_it_ends(with_batches):
    """13 (Celery's 3 and the batches' 10); 12 while a stream is relayed; 13 again once
    it ends."""
    service, gateway = with_batches
    queue = QUEUE.format(service)
    wait_for(lambda: channel_prefetch(queue) == 13, 10, "Celery's prefetch and the batches'")
    stream, _, _ = read_raw(gateway.url, f"/{service}/stream", until=b"data: event 1")
    try:
        wait_for(lambda: channel_prefetch(queue) == 12, 10, "one less while it streams")
    finally:
        stream.close()
    wait_for(lambda: channel_prefetch(queue) == 13, 10, "the prefetch back once it ended")


def test_after_a_reconnect_mid_stream_the_prefetch_is_celerys_again(with_batches):
    """The connection goes while a stream holds a call thread: the new connection has
    Celery's prefetch, and the old stream's end changes nothing (no 14)."""
    service, gateway = with_batches
    queue = QUEUE.format(service)
    stream, _, _ = read_raw(gateway.url, f"/{service}/stream", until=b"data: event 1")
    try:
        wait_for(lambda: channel_prefetch(queue) == 12, 10, "one less while it streams")
        old = consuming_channel(queue)
        close_connection_of(queue)
        wait_for(lambda: consuming_channel(queue) not in (None, old), 30, "the worker to reconnect")
        wait_for(lambda: channel_prefetch(queue) == 13, 10, "Celery's prefetch again")
    finally:
        stream.close()
    again, _, _ = read_raw(gateway.url, f"/{service}/stream", until=b"data: event 1")
    try:
        wait_for(lambda: channel_prefetch(queue) == 12, 10, "one less for a new stream")
    finally:
        again.close()
    wait_for(lambda: channel_prefetch(queue) == 13, 10, "13 once it ended")


def test_add_consumer_while_every_call_thread_streams_waits_for_a_stream_to_end(stack):
    """Remote control's ``add_consumer`` (the health gate sends it when a downstream
    recovers) does not make a worker whose one call thread relays a stream consume;
    the queue is consumed when the stream ends."""
    downstream = StreamsAndWork(work=0.1)
    service = unique_service("addc")
    queue, node = QUEUE.format(service), f"{service}@{socket.gethostname()}"
    stack.worker(service, downstream.url, "-c", "1", "-n", node, named=False)
    gateway = stack.gateway()
    stream, _, _ = read_raw(gateway.url, f"/{service}/stream", until=b"data: event 1")
    try:
        wait_for(lambda: consumers(queue) == 0, 10, "the worker to stop consuming")
        control = Celery(broker=BROKER_URL, accept_content=["json", "msgpack"]).control
        replies = control.add_consumer(queue, destination=[node], reply=True, timeout=10)
        assert len(replies) == 1, replies  # handled: what it did is done
        assert consumers(queue) == 0
    finally:
        stream.close()
    wait_for(lambda: consumers(queue) == 1, 10, "the worker to consume once it ended")

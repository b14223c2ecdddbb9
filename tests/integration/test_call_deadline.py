"""The request's deadline bounds the worker's whole downstream call, through the real
gateway, broker, worker (single and batch mode) and Redis.

A downstream that sends a byte now and then never trips a per-read timeout: only a
deadline on the whole call ends it. The downstream here is a raw socket server that
trickles its answer's head or body, and records when each call started and when the
worker closed its connection (noticed at once, on the downstream's side)."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid

import pytest
import requests
from support import RawServer, unique_service, wait_for

RESULT_URL = "redis://127.0.0.1:6379/0"
# gateway.idempotency.LEASE_MARGIN: a claim's first lease is the request's wait plus this.
LEASE_MARGIN = 10
# How long after its deadline the worker may still hold the downstream's connection.
CUT_WITHIN = 2.0


class Trickler(RawServer):
    """Answers ``/<kind>/<seconds>`` (and a batch, ``/batch``, the same way, by its first
    item's path): ``body`` sends a head with a Content-Length, then a byte every 0.1 s;
    ``head`` sends its header lines a byte every 0.1 s. A call whose ``Idempotency-Key``
    was seen before is answered at once. Each call is recorded: its path, key, when it
    started (the request read) and when it ended (answered, or closed by the worker)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._lock = threading.Lock()
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        path, headers, body = _read_request(conn)
        if path == "/batch":
            path = _first_item_path(body)
        idem = headers.get("idempotency-key")
        call = {"path": path, "key": idem, "started": time.monotonic(), "ended": None}
        with self._lock:
            again = idem is not None and any(c["key"] == idem for c in self.calls)
            self.calls.append(call)
        try:
            if again:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfast"
                )
            else:
                _, kind, seconds = path.split("/")
                self._trickle(conn, kind, float(seconds))
        except OSError:
            pass
        call["ended"] = time.monotonic()
        conn.close()

    def _trickle(self, conn: socket.socket, kind: str, seconds: float) -> None:
        size = int(seconds * 10)
        if kind == "head":
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(size):
                self._pause(conn, 0.1)
                conn.sendall(b"s")
            conn.sendall(b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n")
        conn.sendall(b"Content-Length: %d\r\n\r\n" % size)
        for _ in range(size):
            self._pause(conn, 0.1)
            conn.sendall(b"t")

    @staticmethod
    def _pause(conn: socket.socket, seconds: float) -> None:
        """Wait, but end the call the moment the worker closes its connection."""
        if select.select([conn], [], [], seconds)[0] and not conn.recv(1, socket.MSG_PEEK):
            raise ConnectionResetError("closed by the worker")

    def on(self, path: str) -> list[dict]:
        with self._lock:
            return [call for call in self.calls if call["path"] == path]

    def keyed(self, idem: str) -> list[dict]:
        with self._lock:
            return [call for call in self.calls if call["key"] == idem]


def _read_request(conn: socket.socket) -> tuple[str, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    while len(body) < int(headers.get("content-length", 0)):
        body += conn.recv(65536)
    return lines[0].split(" ")[1], headers, body


def _first_item_path(body: bytes) -> str:
    return json.loads(body)[0]["path"]


@pytest.fixture(scope="module")
def trickler():
    server = Trickler()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(stack):
    return stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)


@pytest.fixture(scope="module")
def single(stack, trickler):
    service = unique_service("deadline")
    stack.worker(service, trickler.url, "-c", "4")
    return service


@pytest.fixture(scope="module")
def batched(stack, trickler):
    service = unique_service("deadlinebatch")
    stack.worker(service, trickler.url, PROXYMQ_BATCH_URL=trickler.url + "/batch")
    return service


def _cut_call(gateway, trickler, service: str, kind: str, method: str) -> None:
    """A 10 s trickle with a 2 s deadline: the client's 504 at its deadline, and the
    downstream's connection closed by the worker soon after it."""
    path = f"/{kind}/10.{uuid.uuid4().int % 10**6:06d}"  # unique, and ~10 s
    sent = time.monotonic()
    answer = requests.request(
        method, f"{gateway.url}/{service}{path}", headers={"X-ProxyMQ-Timeout": "2"}, timeout=30
    )
    assert answer.status_code == 504 and answer.headers["X-ProxyMQ-Error"] == "timeout"
    assert time.monotonic() - sent < 2 + CUT_WITHIN
    wait_for(lambda: trickler.on(path) and trickler.on(path)[0]["ended"], 30, "the call's end")
    (call,) = trickler.on(path)
    held = call["ended"] - sent
    assert held < 2 + CUT_WITHIN, f"the downstream's connection was held {held:.1f} s"


@pytest.mark.parametrize("kind", ["body", "head"])
def test_a_trickling_answer_is_cut_within_two_seconds_of_the_deadline(
    gateway, trickler, single, kind
):
    _cut_call(gateway, trickler, single, kind, "GET")


@pytest.mark.parametrize("kind", ["body", "head"])
def test_a_trickling_batch_answer_is_cut_within_two_seconds_of_the_deadline(
    gateway, trickler, batched, kind
):
    _cut_call(gateway, trickler, batched, kind, "POST")


def test_a_repeat_of_a_cut_idempotent_call_waits_for_it_and_it_ends_within_the_lease(
    gateway, trickler, single
):
    """The first call trickles longer than its key's lease (its wait, 1 s, plus the
    margin). It is cut at its deadline, the worker's 504 releases the key, and only then
    does the repeat, sent right after the first one's 504, call the downstream."""
    idem = f"key-{uuid.uuid4()}"
    url = f"{gateway.url}/{single}/body/{LEASE_MARGIN + 5}"
    sent = time.monotonic()
    first = requests.get(
        url, headers={"Idempotency-Key": idem, "X-ProxyMQ-Timeout": "1"}, timeout=30
    )
    assert first.status_code == 504 and first.headers["X-ProxyMQ-Error"] == "timeout"
    repeat = requests.get(url, headers={"Idempotency-Key": idem}, timeout=60)
    calls = trickler.keyed(idem)
    assert len(calls) == 2, calls
    earlier, later = calls
    assert earlier["ended"] is not None, "a second call while the first still runs"
    assert later["started"] >= earlier["ended"], "a second call while the first still runs"
    assert earlier["ended"] - sent < 1 + CUT_WITHIN, "the first call outlived its deadline"
    assert (repeat.status_code, repeat.content) == (200, b"fast"), repeat.text
    assert "Idempotent-Replayed" not in repeat.headers

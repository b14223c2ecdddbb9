"""Streamed replies on the gateway: parts from the reply queue out to the client as they come.

The reply reader feeds each part of a stream (``proxymq.envelope``) into its ``Stream``;
the request's greenlet writes the chunks to the client (gunicorn sends an answer without
a Content-Length chunked). Parts of another stream id (a redelivered request's second
attempt) are ignored, so a client never gets two copies spliced together.

A stream ends cleanly at its ``end`` part. Anything else ends the client's response
abruptly, without the last chunk, so the client can tell it is incomplete: an ``abort``
(the downstream failed midway, or the worker stopped), a part out of order (one was lost
or overtaken: the body would have a hole), ``PROXYMQ_STREAM_IDLE_TIMEOUT`` without a part
(a stalled downstream), the worker's connection gone (``gateway.liveness``: a worker
killed outright is noticed within seconds, not at the idle timeout), the client going
away, or a client too slow to keep ``PROXYMQ_STREAM_BUFFER_BYTES`` from filling. In
every case but the clean end, the abort and the worker gone, the worker is asked to
cancel (its cancel queue), and closes the downstream connection.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator

import gevent
import gevent.socket
from gevent.event import Event

from gateway import metrics
from gateway.answers import from_downstream, status_line
from proxymq.envelope import ABORT, CHUNK, END, ReplyEnvelope

OPEN, ENDED = "open", "ended"
# Why a stream was cut off (the label of proxymq_gateway_streams_cancelled_total). Only
# these: a part of a kind nobody knows is OTHER, so a message cannot mint label values.
ABORTED, IDLE, CLIENT_GONE, OVERFLOW = "aborted", "idle", "client-gone", "overflow"
OUT_OF_ORDER, OTHER, WORKER_GONE = "out-of-order", "other", "worker-gone"


class Stream:
    """One streamed reply: the parts received and not yet written to the client."""

    def __init__(
        self, stream_id: str, cancel_to: str, buffer_limit: int, numbered: bool = True
    ) -> None:
        self.id = stream_id
        self.cancel_to = cancel_to
        self.state = OPEN
        self._limit = buffer_limit
        self._parts: deque[bytes] = deque()
        self._buffered = 0
        self._wake = Event()
        self._next = 1  # the number the next part must carry: the head was 0
        # A numbered head (every worker since the numbers) numbers all its parts; only
        # an unnumbered one (an older worker) has parts taken unchecked.
        self._numbered = numbered
        # Set by the answer: cuts the client connection, so a writer blocked on a client
        # that does not read gives up at once too.
        self.interrupt: Callable[[], None] | None = None

    def feed(self, kind: str, stream_id: str | None, seq: int | None, body: bytes) -> None:
        """From the reply reader: one part, as it came. An abort ends the stream in any
        order; any other part must carry the next number, or the stream ends there: one
        without a number in a numbered stream is not of its count, never spliced in."""
        if stream_id != self.id or self.state != OPEN:
            return
        if kind != ABORT and (seq is not None or self._numbered):
            if seq != self._next:
                self.state = OUT_OF_ORDER
                self._wake.set()
                return
            self._next += 1
        if kind == CHUNK:
            self._buffered += len(body)
            if self._buffered > self._limit:
                self._stop(OVERFLOW)
                return
            self._parts.append(body)
        elif kind == END:
            self.state = ENDED
        else:  # abort: what came before it still goes out, then the cut
            self.state = ABORTED if kind == ABORT else OTHER
        self._wake.set()

    def _stop(self, reason: str) -> None:
        """Nothing more goes to the client (it is gone, too slow, or the stream idle)."""
        self.state = reason
        self._parts.clear()
        self._buffered = 0
        self._wake.set()
        if self.interrupt is not None:
            self.interrupt()

    def worker_gone(self) -> None:
        """Its worker's connection is gone (``gateway.liveness``): no part can come any
        more. What was received still goes out, then the cut, as after an abort."""
        if self.state == OPEN:
            self.state = WORKER_GONE
            self._wake.set()

    def client_gone(self) -> None:
        if self.state == OPEN:
            self._stop(CLIENT_GONE)

    def chunks(self, idle: float) -> Iterator[bytes]:
        """The body, chunk by chunk; returns at a clean end, stops (state not ENDED)
        otherwise. Greenlets are cooperative: nothing runs between the last look at the
        parts and ``clear``, so no wake-up is lost."""
        while True:
            while self._parts:
                chunk = self._parts.popleft()
                self._buffered -= len(chunk)
                yield chunk
            if self.state != OPEN:
                return
            self._wake.clear()
            if not self._wake.wait(idle):
                self._stop(IDLE)
                return


class StreamAnswer:
    """The WSGI answer for a stream: the head now, then every chunk as it arrives."""

    def __init__(
        self,
        head: ReplyEnvelope,
        stream: Stream,
        correlation_id: str,
        idle: float,
        done: Callable[[Stream], None],
    ) -> None:
        self.status = head.status
        self._head, self._stream, self._idle = head, stream, idle
        self._correlation_id, self._done = correlation_id, done

    def __call__(self, environ, start_response):
        drop = ("content-length", "transfer-encoding")
        headers = [(n, v) for n, v in from_downstream(self._head.headers) if n.lower() not in drop]
        headers.append(("X-Correlation-ID", self._correlation_id))
        start_response(status_line(self.status), headers)
        return _Body(self._stream, self._idle, environ.get("gunicorn.socket"), self._done)


class _Body:
    """The response iterable gunicorn writes out; ``close`` always runs after it."""

    def __init__(self, stream: Stream, idle: float, sock, done: Callable[[Stream], None]) -> None:
        self._stream, self._idle, self._sock, self._done = stream, idle, sock, done
        self._watch = gevent.spawn(_watch_client, sock, stream) if sock is not None else None
        stream.interrupt = self._cut_off
        self._started = time.monotonic()
        metrics.streams_inflight.inc()

    def __iter__(self) -> Iterator[bytes]:
        # gunicorn sends the status and headers with the first write; an empty one sends
        # them now (it writes no chunk for it), so a client sees the stream open (an
        # EventSource's onopen) before the first event.
        yield b""
        for chunk in self._stream.chunks(self._idle):
            metrics.streamed_bytes_total.inc(len(chunk))
            yield chunk
        if self._stream.state != ENDED:
            self._cut_off()

    def _cut_off(self) -> None:
        """No last chunk: shut the connection, so the client sees the answer cut off.
        Done before gunicorn writes the terminating chunk, which then fails and drops
        the connection quietly (gunicorn ignores EPIPE and ECONNRESET)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        metrics.streams_inflight.dec()
        if self._watch is not None:
            self._watch.kill(block=False)
        stream = self._stream
        if stream.state == OPEN:  # gunicorn stopped early: writing to the client failed
            stream.client_gone()
        if stream.state != ENDED:
            metrics.streams_cancelled_total.labels(stream.state).inc()
        self._done(stream)


def _watch_client(sock, stream: Stream) -> None:
    """Notice a client that hangs up while the stream is quiet (a write would notice only
    at the next chunk). A client that sends anything else meanwhile is not watched."""
    try:
        gevent.socket.wait_read(sock.fileno())
        if sock.recv(1, socket.MSG_PEEK) == b"":
            stream.client_gone()
    except OSError:
        stream.client_gone()

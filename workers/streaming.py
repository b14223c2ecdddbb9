"""Streamed answers: a downstream answer relayed in parts, as it arrives.

An answer streams when it is ``text/event-stream``, or chunked without a length, and
its request is a synchronous one (a job stores the whole answer; batch mode answers
many requests with one body). ``workers.forwarding`` hands over the response unread
with its head; the call thread then reads it here, chunk by chunk, and gives each part
to the consumer thread to publish (``workers.pipeline``), in order, to the gateway's
reply queue (parts: ``proxymq.envelope``).

The relay ends at the answer's end, at ``PROXYMQ_STREAM_IDLE_TIMEOUT`` seconds without
a chunk, past ``PROXYMQ_MAX_RESPONSE_BYTES`` in all, or when it is cancelled: the
gateway asks (its client left, or stopped reading) through this worker's cancel queue,
and ``Streams.cancel`` shuts the downstream socket under the blocked read, so the
downstream sees its connection close at once. Every end but the clean one publishes an
``abort``, so the gateway cuts its client off at once whoever stopped the relay.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from proxymq.envelope import ABORT, CHUNK, END, ReplyEnvelope

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
CANCELLED = "cancelled"


def streams(response: http.client.HTTPResponse) -> bool:
    """Whether this answer is relayed in parts rather than read whole: an event stream,
    or chunked without a Content-Length. Chunked *with* one is framing that disagrees
    with itself: read whole, it reaches the client with the length it really has."""
    kind = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    unsized = response.chunked and response.getheader("Content-Length") is None
    return kind == "text/event-stream" or unsized


@dataclass(eq=False)
class Streaming:
    """A downstream answer whose body is still to be read: its head, and its socket."""

    head: ReplyEnvelope
    response: http.client.HTTPResponse
    sock: socket.socket
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """From any thread: stop the relay, and close the downstream connection now."""
        self.cancelled.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """End the answer: read to its end, or dropped unread (cut off at its head)."""
        self.response.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def relay(self, send: Callable[[str, bytes], None], idle: float, limit: int) -> str:
        """Read the body and ``send(kind, bytes)`` each part; return how it ended (END,
        ABORT, or CANCELLED).

        A cancelled stream ends with an abort too: the cancel need not come from the
        client's gateway (a part the broker refused, the connection going), and its
        client would otherwise wait out its idle timeout for a part that never comes."""
        size = 0
        try:
            self.sock.settimeout(idle)
            while not self.cancelled.is_set():
                chunk = self._read()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    log.warning("stream over %d bytes: cut off", limit)
                    send(ABORT, b"")
                    return ABORT
                send(CHUNK, chunk)
            if not self.cancelled.is_set():  # (the shutdown makes the read return nothing)
                send(END, b"")
                return END
        except (OSError, http.client.HTTPException) as exc:
            if not self.cancelled.is_set():
                log.warning("stream broken: %s: %s", type(exc).__name__, exc)
                send(ABORT, b"")
                return ABORT
        finally:
            self.close()
        send(ABORT, b"")
        return CANCELLED

    def _read(self) -> bytes:
        """What has arrived: one read, waiting for data, then more while the socket has
        more at once (up to ``READ_SIZE``). So a downstream writing many small chunks
        fast becomes a few large messages, and one writing an event now and then still
        has each event sent the moment it arrives."""
        data = self.response.read1(READ_SIZE)
        while data and len(data) < READ_SIZE and select.select([self.sock], [], [], 0)[0]:
            more = self.response.read1(READ_SIZE - len(data))
            if not more:
                break
            data += more
        return data


class Streams:
    """The streams a worker is relaying, by correlation id and stream id, for cancels to
    find: a cancel must name both (the stream id is known to the gateway only)."""

    def __init__(self) -> None:
        self._relaying: dict[tuple[str, str], Streaming] = {}

    def add(self, correlation_id: str, stream_id: str, streaming: Streaming) -> None:
        self._relaying[correlation_id, stream_id] = streaming

    def remove(self, correlation_id: str, stream_id: str) -> None:
        self._relaying.pop((correlation_id, stream_id), None)

    def cancel(self, correlation_id: str, stream_id: str) -> None:
        streaming = self._relaying.get((correlation_id, stream_id))
        if streaming is not None:
            streaming.cancel()

    def cancel_all(self) -> None:
        for streaming in list(self._relaying.values()):
            streaming.cancel()

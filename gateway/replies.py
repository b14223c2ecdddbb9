"""The reply side of the gateway's RPC: waiting requests, keyed by correlation id.

Modelled on nameko's ``ReplyListener``: one consumer per process on its own reply queue,
and a map from correlation id to the waiter. A reply whose request has stopped waiting
finds no entry and is dropped, unless its request asked to take it late (an idempotency
key's first request that timed out, ``expect_late``); entries are removed when their
request ends, or when the late one's time is up, so the maps never outgrow the requests
in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gevent
from gevent.event import AsyncResult

from gateway.streams import Stream
from proxymq.envelope import ABORT, StreamPart


@dataclass(frozen=True, slots=True)
class StreamStart:
    """What a waiter gets when its reply streams: the head (a reply envelope, empty
    body) and the stream its parts go to."""

    head: bytes
    stream: Stream


class ReplyRouter:
    """Hands each reply body to the request waiting for its correlation id, and each
    part of a streamed reply to its stream."""

    def __init__(self, stream_buffer_bytes: int = 1024 * 1024) -> None:
        self._waiting: dict[str, AsyncResult] = {}
        self._streams: dict[str, Stream] = {}
        self._late: dict[str, Callable[[bytes], None]] = {}
        self._buffer = stream_buffer_bytes

    def expect(self, correlation_id: str) -> AsyncResult:
        waiter = AsyncResult()
        self._waiting[correlation_id] = waiter
        return waiter

    def forget(self, correlation_id: str) -> None:
        self._waiting.pop(correlation_id, None)

    def expect_late(
        self, correlation_id: str, take: Callable[[bytes], None], within: float
    ) -> None:
        """After its waiter gave up: a reply still arriving within ``within`` seconds goes
        to ``take``, in a greenlet of its own (not the reader's), instead of nowhere."""
        self._late[correlation_id] = take
        gevent.spawn_later(within, self._late.pop, correlation_id, None)

    def deliver(self, correlation_id: str | None, body: bytes) -> bool:
        """Wake the waiter for ``correlation_id``, or hand a late reply to whoever still
        takes it; False when nobody does (it is dropped)."""
        if not correlation_id:
            return False
        waiter = self._waiting.pop(correlation_id, None)
        if waiter is not None:
            waiter.set(body)
            return True
        take = self._late.pop(correlation_id, None)
        if take is None:
            return False
        gevent.spawn(take, body)
        return True

    def start_stream(self, correlation_id: str | None, head: bytes, part: StreamPart) -> bool:
        """A streamed reply's head: wake its waiter with the stream the parts will feed
        (numbered when its head is). False when nobody waits, or the request already
        streams (a second attempt)."""
        if not correlation_id or correlation_id in self._streams:
            return False
        waiter = self._waiting.pop(correlation_id, None)
        if waiter is None:
            return False
        numbered = part.seq is not None
        stream = Stream(part.stream_id, part.cancel_to, self._buffer, numbered)
        self._streams[correlation_id] = stream
        waiter.set(StreamStart(head, stream))
        return True

    def feed(self, correlation_id: str | None, part: StreamPart, body: bytes) -> None:
        stream = self._streams.get(correlation_id) if correlation_id else None
        if stream is not None:
            stream.feed(part.kind, part.stream_id, part.seq, body)

    def open_streams(self) -> list[Stream]:
        return list(self._streams.values())

    def end_stream(self, correlation_id: str) -> None:
        self._streams.pop(correlation_id, None)

    def fail_all(self, error: BaseException) -> None:
        """Wake every waiter with ``error``: their replies can no longer arrive; and cut
        off every stream, whose parts cannot either."""
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.set_exception(error)
        for stream in list(self._streams.values()):
            stream.feed(ABORT, stream.id, None, b"")

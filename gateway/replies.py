"""The reply side of the gateway's RPC: waiting requests, keyed by correlation id.

Modelled on nameko's ``ReplyListener``: one consumer per process on its own reply queue,
and a map from correlation id to the waiter. A reply whose request has stopped waiting
finds no entry and is dropped; entries are removed when their request ends, whatever the
outcome, so the map never outgrows the requests in flight.
"""

from __future__ import annotations

from gevent.event import AsyncResult


class ReplyRouter:
    """Hands each reply body to the request waiting for its correlation id."""

    def __init__(self) -> None:
        self._waiting: dict[str, AsyncResult] = {}

    def expect(self, correlation_id: str) -> AsyncResult:
        waiter = AsyncResult()
        self._waiting[correlation_id] = waiter
        return waiter

    def forget(self, correlation_id: str) -> None:
        self._waiting.pop(correlation_id, None)

    def deliver(self, correlation_id: str | None, body: bytes) -> bool:
        """Wake the waiter for ``correlation_id``; False when nobody waits (a late reply)."""
        waiter = self._waiting.pop(correlation_id, None) if correlation_id else None
        if waiter is None:
            return False
        waiter.set(body)
        return True

    def fail_all(self, error: BaseException) -> None:
        """Wake every waiter with ``error``: their replies can no longer arrive."""
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.set_exception(error)

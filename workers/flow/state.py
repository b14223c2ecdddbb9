"""What a worker knows of one service's flow state, readable at no cost from any thread.

``FlowState`` is the read-only view other parts of the worker (the gateway's fail-fast
announcements, metrics) take of a service: until when its calls are paused (a
downstream's ``Retry-After``), until when its breaker is open. Reads are plain
attribute reads, no Redis round trip: the flow control keeps it current, from this
worker's own calls and from what the other workers announce in Redis
(``workers.flow.shared``).

``on_change`` callbacks are called without arguments, in the thread that saw the change
(a call thread, or the flow thread that listens to Redis), never under a lock: one that
needs the consumer thread hands itself over (``consumer.call_soon``, as the status
announcer, ``workers.announcer``, does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class FlowState:
    def __init__(self, service: str) -> None:
        self.service = service
        self._paused_until = 0.0  # epoch seconds; in the past: not paused
        self._breaker_until = 0.0
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def paused_until(self) -> float | None:
        """Epoch seconds until which no call of the service starts, or None."""
        until = self._paused_until
        return until if until > time.time() else None

    def breaker_open_until(self) -> float | None:
        """Epoch seconds when the open breaker lets its probe through, or None."""
        until = self._breaker_until
        return until if until > time.time() else None

    def closed_until(self) -> float:
        """The later of the two, in epoch seconds (0.0: open)."""
        return max(self._paused_until, self._breaker_until)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change of the pause or the breaker."""
        self._callbacks.append(callback)

    # -- written by the flow control ----------------------------------------------------

    def pause(self, until: float) -> bool:
        """Pause until ``until`` (epoch s) unless already paused longer; whether it changed."""
        with self._lock:
            if until <= self._paused_until:
                return False
            self._paused_until = until
        self._changed()
        return True

    def open_breaker(self, until: float) -> None:
        with self._lock:
            if until == self._breaker_until:
                return
            self._breaker_until = until
        self._changed()

    def _changed(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:  # a listener's bug must not stop the flow control
                log.exception("a flow state listener failed")

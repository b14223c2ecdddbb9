"""The service's circuit breaker, shared by its workers through Redis.

``PROXYMQ_BREAKER_FAILURES`` consecutive failed calls (any worker's: one counter in
Redis, set back to 0 by a success) open it for ``PROXYMQ_BREAKER_OPEN`` seconds; then
exactly one call, the probe, goes: the worker that takes the probe key (``SET NX``, with
the lease's bound, so a probe whose worker died is taken again) makes it. Its success
closes the breaker, its failure opens it again. Opening and closing are announced on the
service's channel (``workers.flow.shared``), so every worker's ``FlowState`` shows it
without asking Redis; while Redis cannot be reached, each worker keeps a breaker of its
own with the same rule.
"""

from __future__ import annotations

import threading
import time

from workers.flow import metrics
from workers.flow.shared import DOWN, Shared, key
from workers.flow.state import FlowState

FAILED = frozenset({429, 500, 502, 503, 504})  # and no answer at all (502, 504)
PROBE_POLL_S = 0.2
PROBE = "probe"  # what ``admit`` gives the call that took the probe


class Breaker:
    def __init__(
        self,
        shared: Shared,
        state: FlowState,
        failures: int,
        open_s: float,
        call_timeout: float,
    ) -> None:
        self._shared = shared
        self._state = state
        self._failures_needed = failures
        self._open_s = open_s
        self._probe_ms = int((call_timeout + 10) * 1000)
        service = state.service
        self._count_key = key(service, "breaker-failures")
        self._probe_key = key(service, "breaker-probe")
        self._tripped = False  # opened, and no probe succeeded since
        self._local_failures = 0  # while Redis is down
        self._lock = threading.Lock()

    def admit(self) -> bool | str | float:
        """True: call; ``PROBE``: call, as the probe; else seconds to wait."""
        if not self._tripped:
            return True
        closed = (self._state.breaker_open_until() or 0.0) - time.time()
        if closed > 0:
            return closed
        taken = self._shared.run(
            lambda r: r.set(self._probe_key, self._shared.id, nx=True, px=self._probe_ms)
        )
        if taken is DOWN:
            return True
        return PROBE if taken else PROBE_POLL_S

    def abandon(self) -> None:
        """The probe's own request's deadline cut it off: it says nothing of the service,
        so the next call probes instead (rather than all waiting out the probe's bound)."""
        self._shared.run(lambda r: r.delete(self._probe_key))

    def record(self, status: int) -> None:
        """A call's outcome (after ``admit`` let it go)."""
        if status in FAILED:
            self._failed()
        elif self._tripped or self._local_failures:
            self._close()
        else:
            self._shared.run(lambda r: r.set(self._count_key, 0))

    def opened(self, until: float) -> None:
        """Another worker opened (``until`` > now) or closed (0) the breaker."""
        self._tripped = until > 0
        self._state.open_breaker(until)
        metrics.breaker_open.labels(self._state.service).set(1 if self._tripped else 0)

    def _failed(self) -> None:
        count = self._shared.run(lambda r: r.incr(self._count_key))
        if count is DOWN:
            with self._lock:
                self._local_failures += 1
                count = self._local_failures
        if self._tripped or count >= self._failures_needed:
            self._open()

    def _open(self) -> None:
        until = time.time() + self._open_s
        self._tripped = True
        self._state.open_breaker(until)
        metrics.breaker_open.labels(self._state.service).set(1)
        self._shared.run(lambda r: r.delete(self._probe_key))
        self._shared.announce(self._state.service, {"breaker_open_until": until})

    def _close(self) -> None:
        with self._lock:
            self._local_failures = 0
        was = self._tripped
        self._tripped = False
        self._shared.run(lambda r: r.delete(self._count_key, self._probe_key))
        if was:
            self._state.open_breaker(0.0)
            metrics.breaker_open.labels(self._state.service).set(0)
            self._shared.announce(self._state.service, {"breaker_open_until": 0})

"""One service's flow control, at the one seam the pipeline calls it through.

Before a call (in its call thread): ``enter()`` gives a ``Permit`` or the seconds after
which to look again; the pipeline then hands the batch back to the consumer thread,
which keeps it waiting in the worker (its deadline running) and asks again on the
event loop's timer, so no call thread sits idle waiting. After the call: ``leave``
with its outcome (status, ``Retry-After``, seconds), which gives the slot back and
starts a service-wide pause on a 429 or 503 that names a ``Retry-After``.

A service without limits still gets a ``Flow``: pauses apply to every service. Then
``enter`` costs a clock read and ``leave`` a status comparison.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

from proxymq.config import ServiceConfig
from workers.flow import adaptive, metrics, retry_after
from workers.flow.breaker import PROBE, Breaker
from workers.flow.leases import Leases
from workers.flow.rate import RateLimit
from workers.flow.shared import Shared, key
from workers.flow.state import FlowState

log = logging.getLogger(__name__)

PAUSING = frozenset({429, 503})
POLL_MIN_S, POLL_MAX_S = 0.002, 0.05  # how soon to ask again for a slot
PREFETCH_MARGIN = 1  # requests held beyond an ``auto`` limit's calls


@dataclass(slots=True)
class Permit:
    """A call's right to start: the lease it holds (if any), whether it holds one, and
    whether it is the breaker's probe."""

    lease: str | None
    leased: bool
    probe: bool = False


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What a call's answer says of the service: its status and headers, how long it
    took, whether an answer came at all (not: the connection failed, or the service's
    own timeout), whether the request's deadline cut it off, and whether it streamed
    (then ``seconds`` is the body's length, which says nothing of the service's speed)."""

    status: int
    headers: list[tuple[str, str]]
    seconds: float
    answered: bool = True
    cut_by_deadline: bool = False
    streamed: bool = False


FREE = Permit(None, False)  # no cap: nothing to give back
UNCALLED = Permit(None, False)  # its deadlines passed: answered 504 without a call


class Flow:
    def __init__(self, service: ServiceConfig, shared: Shared | None) -> None:
        self.service = service
        self.state = FlowState(service.name)
        self.shared = shared  # also the retry budget's (``workers.flow.budget``)
        self._shared = shared
        self.leases = _leases(service, shared)
        self._floor = adaptive.LatencyFloor()
        self.rate = (
            RateLimit(shared, service.name, service.rate_limit, service.rate_burst)
            if shared is not None and service.rate_limit is not None
            else None
        )
        self.breaker = (
            Breaker(
                shared,
                self.state,
                service.breaker_failures,
                service.breaker_open,
                service.downstream_timeout,
            )
            if shared is not None and service.breaker_failures is not None
            else None
        )
        # Whether anything but pauses applies (a plain attribute: read on every call).
        self.limited = any(x is not None for x in (self.leases, self.rate, self.breaker))
        self._latency = 0.0  # running estimate of a call's seconds, to pace the polls
        if shared is not None:
            shared.listen(service.name, self._heard)
            _show(service.name)

    def close(self) -> None:
        """At the worker's shutdown, after its last call."""
        if self.leases is not None:
            self.leases.close()

    def local_calls(self, threads: int) -> int:
        """Calls this worker should have in flight at most: a cap below ``threads`` is
        also the most it could use, so it takes no more requests than that (prefetch)."""
        if self.leases is None:
            return threads
        return min(threads, self.leases.auto[1] if self.leases.auto else int(self.leases.limit))

    def prefetch(self, threads: int) -> int:
        """Requests this worker should hold at most, now: ``local_calls``, but under
        ``auto`` the current limit and ``PREFETCH_MARGIN`` (one request ready when a slot
        frees), so that a worker does not hoard what a worker with a free slot could
        serve. The pipeline follows it after every call (``Pipeline._follow_limit``)."""
        if self.leases is None or not self.leases.auto:
            return self.local_calls(threads)
        return min(threads, math.ceil(self.leases.limit) + PREFETCH_MARGIN)

    def closed_for(self) -> float:
        """Seconds before any call may start (a pause), 0.0 when open."""
        until = self.state.closed_until()
        return max(0.0, until - time.time()) if until else 0.0

    # -- the seam ----------------------------------------------------------------------

    def enter(self) -> Permit | float:
        """In a call thread, before the call: a permit, or seconds to wait."""
        closed = self.closed_for()
        if closed > 0:
            return closed
        if not self.limited:
            return FREE
        lease: str | None = None
        if self.leases is not None:
            taken = self.leases.acquire()
            if taken is False:
                return self._poll_interval()
            if isinstance(taken, float):
                return taken  # paused by another worker, not announced here yet
            lease = taken
        if self.rate is not None:
            wait = self.rate.take()
            if wait > 0:
                if self.leases is not None:
                    self.leases.release(lease)
                return wait
        if self.breaker is not None:  # last: a probe taken is a call made
            admitted = self.breaker.admit()
            if isinstance(admitted, float):
                if self.leases is not None:
                    self.leases.release(lease)
                return admitted
            return Permit(lease, self.leases is not None, admitted == PROBE)
        return Permit(lease, self.leases is not None)

    def leave(self, permit: Permit, outcome: CallOutcome) -> None:
        """In the call thread, after the call: give the slot back, learn from the answer.
        A call its own request's deadline cut off says nothing of the service: a client
        with short deadlines must not open the breaker or cut the limit for everyone."""
        if permit is UNCALLED:
            return
        if outcome.cut_by_deadline:
            if permit.leased:
                self.leases.release(permit.lease)
            if permit.probe:
                self.breaker.abandon()
            return
        if outcome.status in PAUSING:  # before the slot goes back: no call slips in
            self._pause_on(outcome.headers)
        if permit.leased:
            if self.leases.auto:
                ok = adaptive.verdict(outcome, self._floor)
                self.leases.release(permit.lease, ok)
            else:
                self.leases.release(permit.lease)
        if self.breaker is not None:
            self.breaker.record(outcome.status)
        if not outcome.streamed:
            self._latency += 0.2 * (outcome.seconds - self._latency)

    # -- pauses ------------------------------------------------------------------------

    def _pause_on(self, headers: list[tuple[str, str]]) -> None:
        wait = retry_after.seconds(headers)
        if wait is None or wait <= 0:
            return  # a bare 429 or 503 pauses nothing
        wait = min(wait, self.service.max_pause)
        until = time.time() + wait
        before = max(self.state.closed_until(), time.time())
        if not self.state.pause(until):
            return
        metrics.paused_seconds_total.labels(self.service.name).inc(until - before)
        log.warning(
            "%s answered with Retry-After: calls paused for %.1f s on every worker",
            self.service.name,
            wait,
        )
        if self._shared is not None:
            pause = key(self.service.name, "pause")
            self._shared.run(lambda r: r.set(pause, until, px=max(1, int(wait * 1000))))
            self._shared.announce(self.service.name, {"paused_until": until})

    def _heard(self, message: dict) -> None:
        """Another worker's announcement (the flow thread)."""
        until = message.get("paused_until")
        if isinstance(until, int | float):
            self.state.pause(min(float(until), time.time() + self.service.max_pause))
        until = message.get("breaker_open_until")
        if isinstance(until, int | float) and self.breaker is not None:
            self.breaker.opened(float(until))

    def _poll_interval(self) -> float:
        """When to ask again for a slot: about when one should free up (a call's time
        over the cap), jittered so that the workers do not all ask at once."""
        guess = self._latency / max(1, self.leases.limit)
        return min(POLL_MAX_S, max(POLL_MIN_S, guess)) * random.uniform(0.5, 1.5)


def _leases(service: ServiceConfig, shared: Shared | None) -> Leases | None:
    if shared is None or service.max_concurrency is None:
        return None
    timeout = service.downstream_timeout
    if service.max_concurrency == "auto":
        bounds = (service.min_concurrency, service.auto_max_concurrency)
        return Leases(shared, service.name, None, timeout, auto=bounds)
    return Leases(shared, service.name, int(service.max_concurrency), timeout)


def _show(service: str) -> None:
    """The service's flow series at zero from the start, so dashboards and alerts see
    them before anything happens (``retries_total`` appears with its first reason)."""
    metrics.flow_degraded.labels(service).set(0)
    metrics.breaker_open.labels(service).set(0)
    metrics.paused_seconds_total.labels(service)
    metrics.flow_wait.labels(service)

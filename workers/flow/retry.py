"""Safe retries: whether a failed call's request is tried again, and after how long.

Only a safe request (SPEC.md: GET, HEAD, OPTIONS, PUT, DELETE, or any with an
``Idempotency-Key``), only after a failed call (no answer: connection failed or timed
out; or 429, 502, 503, 504), at most ``PROXYMQ_RETRIES`` extra attempts. The wait is
exponential from ``PROXYMQ_RETRY_BACKOFF_MS`` with full jitter (AWS's "exponential
backoff and jitter"), capped at 10 s, at least a ``Retry-After`` (itself at most
``PROXYMQ_MAX_PAUSE``, as the pause it starts: the request waits unacknowledged in the
worker meanwhile, and a downstream must not keep it there up to its deadline); a retry
that could not start before the request's deadline is not made (the client gets the last
answer).

The retry budget (Envoy's, ``workers.flow.budget``): retries stay at most
``PROXYMQ_RETRY_BUDGET`` of the service's calls over the last 10 s, all its workers
together, so a failing service is not hit harder by the retries themselves.

The wait itself holds no call thread: the pipeline hands the request back to the
consumer thread, whose timer puts it back in line (through the flow control again).
"""

from __future__ import annotations

import random
import time

from proxymq.config import ServiceConfig
from proxymq.envelope import ReplyEnvelope
from workers.delivery import Delivery
from workers.flow import metrics, retry_after
from workers.flow.budget import RetryBudget
from workers.flow.shared import Shared

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRIED_STATUSES = frozenset({429, 502, 503, 504})
FINAL_ERRORS = frozenset({"response-too-large", "timeout"})  # no retry can help
CAP_S = 10.0


def safe(delivery: Delivery) -> bool:
    request = delivery.request
    if request.method in SAFE_METHODS:
        return True
    return any(name.lower() == "idempotency-key" for name, _ in request.headers)


def failed(reply: ReplyEnvelope) -> str | None:
    """Why ``reply`` is a failed call worth another attempt (the metric's reason)."""
    if reply.status not in RETRIED_STATUSES or reply.error in FINAL_ERRORS:
        return None
    if reply.error == "downstream-unavailable":
        return "connection"
    return str(reply.status)


class RetryPolicy:
    def __init__(self, service: ServiceConfig, shared: Shared | None = None) -> None:
        """``shared``: the service's workers' Redis, for a service-wide budget."""
        self.service = service
        self.budget = RetryBudget(service.retry_budget, shared, service.name)

    def called(self) -> None:
        """One attempt made (first or retry): the budget's base."""
        self.budget.called()

    def after(self, delivery: Delivery, reply: ReplyEnvelope) -> float | None:
        """Seconds to wait before the next attempt of ``delivery``, or None: no retry."""
        if delivery.attempt > self.service.retries or not safe(delivery):
            return None
        reason = failed(reply)
        if reason is None:
            return None
        wait = self._backoff(delivery.attempt)
        asked = retry_after.seconds(reply.headers)
        if asked is not None:  # bounded as a pause is: a hostile one must not pin it
            wait = max(wait, min(asked, self.service.max_pause))
        if time.monotonic() + wait >= delivery.due:
            return None  # it could not start before the deadline
        if not self.budget.spend():
            return None
        metrics.retries_total.labels(self.service.name, reason).inc()
        return wait

    def _backoff(self, attempt: int) -> float:
        ceiling = min(CAP_S, self.service.retry_backoff_ms / 1000 * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)

"""What each service can serve now, from the workers' announcements on ``proxymq.status``.

Each gateway process binds an exclusive, auto-delete queue of its own to the fanout
exchange on its broker link (``listen``, at every connect) and keeps the latest
``proxymq.status.Status`` of every worker of every service in memory, folded into one
``ServiceState`` per service as each message arrives: a request then costs one dict
look-up and a clock read (``refusal``), never a round trip.

Times are taken relative to the sender's own clock (``until - sent_at``) and placed on
this process's monotonic clock at receipt, so clock skew between machines moves nothing,
and a state counts as known for ``MAX_AGE`` seconds after it arrived: workers gone (or
the exchange silent), the gateway publishes as it would without any of this.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import amqp

from gateway import errors
from proxymq import status as wire
from proxymq.parsers import is_service_name, queue_name

log = logging.getLogger(__name__)

TREND_MIN_S = 0.5  # two states closer than this give no trend of their own
MAX_WORKERS = 10_000  # worker entries kept in all: a flood of invented names stops here
MAX_RETRY_AFTER = 86_400  # a day: a client is never told to come back later than that


@dataclass(frozen=True, slots=True)
class _Seen:
    """One worker's status, placed on this process's monotonic clock."""

    at: float  # when it arrived
    closed_at: float  # breaker or pause over (<= at: neither)
    drain_rate: float
    depth: int
    held: int


@dataclass(frozen=True, slots=True)
class ServiceState:
    """A service as all its live workers see it."""

    at: float  # the newest announcement's arrival (monotonic)
    closed_at: float  # the breaker is open or the service paused until then (monotonic)
    drain_rate: float  # all workers together, requests per second
    backlog: int  # messages ahead of a new request: the queue's, and those held by workers
    trend: float = 0.0  # how the backlog changed between the last two states, per second

    def wait(self, now: float) -> float | None:
        """Seconds before a request published at ``now`` would start; None when unknown.
        The backlog is carried forward from when it was counted (up to 2 s before) along
        its recent trend: draining, it is smaller by now; filling, larger."""
        backlog = self.backlog + self.trend * (now - self.at)
        if backlog <= 0:
            return 0.0
        if self.drain_rate <= 0:
            return None  # nothing drained lately: no estimate (never a refusal)
        # A vanishing rate's quotient overflows to infinity: no JSON, no Retry-After.
        return min(backlog / self.drain_rate, wire.MAX_NUMBER)


class ServiceStates:
    """The latest state of every service; fed by the broker link's reader greenlet."""

    def __init__(
        self,
        users: frozenset[str] | None = None,
        known_queues: set[str] | None = None,
        clock=time.monotonic,
    ) -> None:
        """``users``: ``PROXYMQ_REPLY_USERS``; a status from anyone else is dropped.
        ``known_queues``: the broker link's, to which an announced service's queue is
        added (a worker serves it: a safe metric label, ``gateway.metrics.label``)."""
        self._users = users
        self._known_queues = known_queues if known_queues is not None else set()
        self._clock = clock
        self._workers: dict[str, dict[str, _Seen]] = {}
        self._states: dict[str, ServiceState] = {}

    # -- the broker's side ----------------------------------------------------------------

    def listen(self, connection: amqp.Connection) -> str | None:
        """Declare the exchange and this process's queue on it, and consume it; the
        queue's name, or None when the broker refused (the gateway then works as
        without announcements, and says so once a connect)."""
        try:
            channel = connection.channel()
            channel.exchange_declare(
                wire.EXCHANGE, wire.EXCHANGE_TYPE, durable=True, auto_delete=False
            )
            queue, _, _ = channel.queue_declare(queue="", exclusive=True, auto_delete=True)
            channel.queue_bind(queue, wire.EXCHANGE)
            channel.basic_consume(queue=queue, no_ack=True, callback=self.receive)
        except amqp.exceptions.ChannelError as exc:  # no permission: the channel is closed
            log.warning("not reading %s (services' states unknown): %r", wire.EXCHANGE, exc)
            return None
        return queue

    def receive(self, message: amqp.Message) -> None:
        """One announcement. Only as routed by the exchange (anyone allowed to publish
        to the default exchange could send to the queue by its name) and, with
        ``PROXYMQ_REPLY_USERS``, only from those broker users (``user_id`` is checked
        by the broker, as on replies)."""
        if (message.delivery_info or {}).get("exchange") != wire.EXCHANGE:
            return
        user = message.properties.get("user_id")
        if self._users is not None and user not in self._users:
            log.warning("dropped a status from broker user %r: not in PROXYMQ_REPLY_USERS", user)
            return
        body = message.body
        try:
            status = wire.decode(body if isinstance(body, bytes) else str(body).encode())
        except wire.BadStatus as exc:
            log.warning("dropped a malformed status: %s", exc)
            return
        if not is_service_name(status.service):
            return
        try:
            self._keep(status)
        except Exception:  # advisory: nothing a status holds may drop the replies' link
            log.exception("dropped a status that could not be kept: %r", status)

    def _keep(self, status: wire.Status) -> None:
        now = self._clock()
        until = max(status.breaker_open_until or 0.0, status.paused_until or 0.0)
        seen = _Seen(
            at=now,
            closed_at=now + (until - status.sent_at) if until else now,
            drain_rate=status.drain_rate,
            depth=status.depth,
            held=status.held,
        )
        workers = self._workers.get(status.service)
        new = workers is None or status.worker not in workers
        if new and self._count() >= MAX_WORKERS:
            self._forget_old(now)
            if self._count() >= MAX_WORKERS:
                return  # a flood of invented names: keep what is known
        if workers is None:
            workers = self._workers.setdefault(status.service, {})
            self._known_queues.add(queue_name(status.service))
        workers[status.worker] = seen
        for worker in [w for w, s in workers.items() if now - s.at > wire.MAX_AGE]:
            del workers[worker]  # gone: its rate no longer drains the queue
        state = _fold(workers, seen)
        self._states[status.service] = _with_trend(state, self._states.get(status.service))

    def _count(self) -> int:
        return sum(len(workers) for workers in self._workers.values())

    def _forget_old(self, now: float) -> None:
        for service, workers in list(self._workers.items()):
            for worker in [w for w, s in workers.items() if now - s.at > wire.MAX_AGE]:
                del workers[worker]
            if not workers:
                del self._workers[service]
                self._states.pop(service, None)

    # -- the request's side ---------------------------------------------------------------

    def state(self, service: str) -> ServiceState | None:
        """The service's state, None when unknown or older than ``MAX_AGE``."""
        state = self._states.get(service)
        if state is None or self._clock() - state.at > wire.MAX_AGE:
            return None
        return state

    def refusal(
        self, service: str, seconds_left: float, prioritized: bool = False
    ) -> errors.GatewayError | None:
        """Why a synchronous request with ``seconds_left`` cannot be served, if it
        cannot: 503 ``service-unavailable`` while the breaker is open or the service is
        paused, 503 ``deadline-unreachable`` when the estimated wait exceeds its time.
        A ``prioritized`` request (``X-ProxyMQ-Priority`` above 0) goes ahead of some of
        the backlog, by how much nobody here knows: never refused for its wait."""
        state = self._states.get(service)
        if state is None:
            return None
        now = self._clock()
        if now - state.at > wire.MAX_AGE:
            return None
        if state.closed_at > now:
            return errors.service_unavailable(service, _retry_after(state.closed_at - now))
        wait = None if prioritized else state.wait(now)
        if wait is not None and wait > seconds_left:
            return errors.deadline_unreachable(service, _retry_after(wait))
        return None

    def wait(self, service: str) -> float | None:
        """The estimated seconds before a request published now would start."""
        state = self.state(service)
        if state is None:
            return None
        now = self._clock()
        if state.closed_at > now:
            return None  # the breaker's probe decides; no estimate
        return state.wait(now)


def _retry_after(seconds: float) -> int:
    """Whole seconds, at least one, at most ``MAX_RETRY_AFTER`` (an announced time is
    whatever a worker's clock or a peer said)."""
    return max(1, min(MAX_RETRY_AFTER, math.ceil(seconds)))


def _fold(workers: dict[str, _Seen], newest: _Seen) -> ServiceState:
    """One service's state from its live workers' latest statuses: their rates add up;
    the queue's depth and the breaker or pause are the newest announcement's (the
    workers share them, and the newest is the latest word on them)."""
    return ServiceState(
        at=newest.at,
        closed_at=newest.closed_at,
        drain_rate=sum(s.drain_rate for s in workers.values()),
        backlog=newest.depth + sum(s.held for s in workers.values()),
    )


def _with_trend(state: ServiceState, previous: ServiceState | None) -> ServiceState:
    """``state`` with the backlog's trend since ``previous`` (its own when they came less
    than ``TREND_MIN_S`` apart, which would magnify a count's noise; none after a gap)."""
    if previous is None or state.at - previous.at > wire.MAX_AGE:
        return state
    elapsed = state.at - previous.at
    if elapsed < TREND_MIN_S:
        trend = previous.trend
    else:
        trend = (state.backlog - previous.backlog) / elapsed
    return dataclasses.replace(state, trend=trend)

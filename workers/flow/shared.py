"""The Redis a service's workers share their flow state in, and what to do without it.

One ``Shared`` per worker process (on ``PROXYMQ_RESULT_URL``). Every Redis command of the
flow control goes through ``run``: a Redis that cannot be reached (or refuses: any
Redis error) makes it return ``DOWN`` instead of raising, marks the worker degraded
(logged once, the gauge ``proxymq_worker_flow_degraded``) and keeps further commands off Redis for
``RECHECK_S``, so a dead Redis costs no connect timeout per call. The limits then use
their local share (``local_share``), and the first command that succeeds again ends it.

A daemon thread (``proxymq-flow``) keeps the rest current without touching the request
path: it runs the ``every_tick`` steps; every ``HEARTBEAT_S`` it registers this worker
under each limited service (a sorted set scored by time, so a dead worker drops out),
counting the service's workers for the local share; and it listens on each service's
channel for the pauses and breaker states other workers announce (``workers.flow.state``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.flow import metrics

log = logging.getLogger(__name__)

DOWN = object()  # what ``run`` returns when Redis could not be asked
RECHECK_S = 1.0  # while degraded, try Redis again at most this often
HEARTBEAT_S = 2.0
WORKER_TTL_S = 3 * HEARTBEAT_S  # a worker not seen for this long is gone
TIMEOUT_S = 0.5  # for one command: the limits fall back rather than wait on Redis
# Any error of Redis's, not only a lost connection: one that answers but refuses (a
# read-only replica after a failover, OOM, MISCONF, BUSY) serves the limits no better,
# and an error let through would leave the call it was asked for neither made nor
# answered.
UNUSABLE = (redis.RedisError, OSError)


def key(service: str, what: str) -> str:
    return f"proxymq:flow:{{{service}}}:{what}"


def channel(service: str) -> str:
    return f"proxymq:flow:{service}"


class Shared:
    def __init__(self, url: str, services: list[str]) -> None:
        self.id = uuid.uuid4().hex  # this worker, in leases and the registry
        self.redis = redis.Redis.from_url(
            url,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._services = services
        self._workers = dict.fromkeys(services, 1)  # last known count, for local shares
        self._down_until = 0.0  # monotonic; 0.0: Redis is up
        self._degraded = False
        self._lock = threading.Lock()
        self._listeners: dict[str, Callable[[dict], None]] = {}
        self._ticks: list[Callable[[], None]] = []
        self._on_beat: list[Callable[[redis.Redis], None]] = []

    @property
    def degraded(self) -> bool:
        return self._degraded

    def workers(self, service: str) -> int:
        """The service's workers this worker last knew of (at least itself)."""
        return max(1, self._workers.get(service, 1))

    def local_share(self, service: str, limit: float) -> float:
        """A limit's share for this worker while Redis is down: ÷ workers, at least 1."""
        return max(1.0, limit / self.workers(service))

    def run(self, command: Callable[[redis.Redis], Any]) -> Any:
        """``command(redis)``'s result, or ``DOWN`` (degraded) if Redis cannot answer."""
        if self._down_until and time.monotonic() < self._down_until:
            return DOWN
        try:
            result = command(self.redis)
        except UNUSABLE as exc:
            self._went_down(exc)
            return DOWN
        if self._degraded:
            self._came_back()
        return result

    def listen(self, service: str, on_message: Callable[[dict], None]) -> None:
        """Hand every announcement on ``service``'s channel to ``on_message``."""
        self._listeners[service] = on_message

    def every_tick(self, step: Callable[[], None]) -> None:
        """Run ``step()`` in the flow thread about every 0.2 s (the retry budget sends its
        calls not sent yet, ``workers.flow.budget``)."""
        self._ticks.append(step)

    def every_beat(self, step: Callable[[redis.Redis], None]) -> None:
        """Run ``step(redis)`` in the flow thread on every heartbeat (lease renewals)."""
        self._on_beat.append(step)

    def announce(self, service: str, message: dict) -> None:
        """Tell the service's other workers (and this one) of a change."""
        self.run(lambda r: r.publish(channel(service), json.dumps(message)))

    def start(self) -> None:
        threading.Thread(target=self._loop, name="proxymq-flow", daemon=True).start()

    # -- degraded ----------------------------------------------------------------------

    def _went_down(self, exc: BaseException) -> None:
        with self._lock:
            self._down_until = time.monotonic() + RECHECK_S
            if self._degraded:
                return
            self._degraded = True
        log.warning(
            "flow control: Redis cannot be reached (%s); each limit falls back to this "
            "worker's share until it can",
            type(exc).__name__,
        )
        for service in self._services:
            metrics.flow_degraded.labels(service).set(1)

    def _came_back(self) -> None:
        with self._lock:
            if not self._degraded:
                return
            self._degraded, self._down_until = False, 0.0
        log.warning("flow control: Redis is back; the limits are shared again")
        for service in self._services:
            metrics.flow_degraded.labels(service).set(0)

    # -- the flow thread ---------------------------------------------------------------

    def _loop(self) -> None:
        pubsub = None
        next_beat = 0.0
        while True:
            for step in self._ticks:
                try:
                    step()
                except Exception:
                    log.exception("a flow thread step failed")
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_S
                    self._beat()
                if pubsub is None and self._listeners and not self._degraded:
                    pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(*(channel(s) for s in self._listeners))
                if pubsub is None:
                    time.sleep(0.2)
                    continue
                message = pubsub.get_message(timeout=0.2)
                if message is not None:
                    self._dispatch(message)
            except UNUSABLE as exc:
                self._went_down(exc)
                pubsub = _closed(pubsub)
                time.sleep(RECHECK_S)
            except Exception:
                log.exception("the flow thread failed a step")
                pubsub = _closed(pubsub)
                time.sleep(RECHECK_S)

    def _beat(self) -> None:
        """Register this worker under each service; count the live ones."""
        now_ms = int(time.time() * 1000)
        with self.redis.pipeline(transaction=False) as pipe:
            for service in self._services:
                workers = key(service, "workers")
                pipe.zadd(workers, {self.id: now_ms})
                pipe.zremrangebyscore(workers, "-inf", now_ms - WORKER_TTL_S * 1000)
                pipe.zcard(workers)
                pipe.pexpire(workers, int(WORKER_TTL_S * 1000))
            results = pipe.execute()
        for number, service in enumerate(self._services):
            self._workers[service] = int(results[number * 4 + 2])
        for step in self._on_beat:
            step(self.redis)
        if self._degraded:
            self._came_back()

    def _dispatch(self, message: dict) -> None:
        service = message["channel"].decode().removeprefix("proxymq:flow:")
        listener = self._listeners.get(service)
        if listener is not None:
            listener(json.loads(message["data"]))


def _closed(pubsub):
    if pubsub is not None:
        try:
            pubsub.close()
        except Exception as exc:  # already broken
            log.debug("closing the flow subscription: %r", exc)
    return None

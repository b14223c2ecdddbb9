"""The service-wide concurrency cap: one lease in Redis per call in flight.

Leases, not a counter: each is a member of the service's sorted set, scored by the time
it expires (``PROXYMQ_DOWNSTREAM_TIMEOUT`` + 10 s after it was taken; a call's socket is
shut at the downstream timeout, so a live worker always gives its lease back first).
Taking one first drops the expired, so the slots of a worker that died holding them
come back by themselves. A live worker renews its leases on every heartbeat of the flow
thread (``Shared.every_beat``): a streamed answer's body is not bounded by the downstream
timeout, and its slot must not expire under it while it still runs. Redis's own clock
(``TIME``) scores them: the workers' clocks need not agree. Under ``auto`` the cap is the
shared adaptive limit (``workers.flow.adaptive``), read by the same script and adjusted
by the one that gives the lease back.

While Redis cannot be reached, a worker allows its local share of the cap
(``Shared.local_share``) among the calls it has in flight.

**A cap far from binding costs no round trip per call.** Taking and giving back a lease
are two round trips, 250 µs of a worker's CPU per call (0.6 of the throughput of a
worker serving a thousand calls a second, uncapped). While the leases in Redis are at
most a ``ROOMY``-th of a fixed cap, a call that ends keeps its lease for this worker's
next call (``_idle``). Only the flow thread's tick (every 0.2 s) decides that the cap has
room (``_roomy``): it gives the kept leases back, and finds room only when Redis
answered, no lease of this worker's calls is gone from it (flushed, failed over), and
no pause is set (a pause another worker announced stops kept leases within a tick even
if the announcement was lost). Taking a lease through Redis can only find that the
room is gone. Every lease stays in Redis, so the cap holds; a kept lease Redis could
not take back is given back on the next tick that can; a worker shutting down keeps
none. Not under ``auto``: each call's outcome moves that limit, in the script that
gives its lease back.
"""

from __future__ import annotations

import itertools
import math
import threading

from workers.flow import adaptive, metrics
from workers.flow.shared import DOWN, Shared, key

SLACK_S = 10.0
ROOMY = 4

# KEYS[1] leases, KEYS[2] the auto limit's hash, KEYS[3] the service's pause; ARGV: limit
# (0: read KEYS[2]), lease ms, member, the auto limit's start. Returns {1 taken | 0 the
# cap is reached, the cap, the leases taken, the auto limit's cuts} or, while a pause
# lasts, {0, 0, its ms left}: a worker that has not heard of the pause yet cannot start
# a call in it.
_ACQUIRE = """
local paused = redis.call('PTTL', KEYS[3])
if paused > 0 then
  return {0, 0, paused}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local cuts = 0
if limit == 0 then
  local auto = redis.call('HMGET', KEYS[2], 'limit', 'cuts')
  limit = math.floor(tonumber(auto[1] or ARGV[4]))
  cuts = tonumber(auto[2] or 0)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit then
  return {0, limit}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, limit, redis.call('ZCARD', KEYS[1]), cuts}
"""

# KEYS[1] leases; ARGV[1] lease ms, the rest: this worker's leases still held. Moves
# their expiry on (XX: one given back meanwhile is not taken again).
_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"""


# KEYS[1] leases, KEYS[2] the service's pause; ARGV[1] how many idle leases follow
# (given back), the rest: leases in use. Returns the leases left, the pause's ms left
# (or <= 0), and the leases in use that are gone (a flushed Redis).
_GIVE_BACK = """
local idle = tonumber(ARGV[1])
for i = 2, idle + 1 do
  redis.call('ZREM', KEYS[1], ARGV[i])
end
local gone = {}
for i = idle + 2, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    table.insert(gone, ARGV[i])
  end
end
return {redis.call('ZCARD', KEYS[1]), redis.call('PTTL', KEYS[2]), gone}
"""


class Leases:
    def __init__(
        self,
        shared: Shared,
        service: str,
        limit: int | None,
        call_timeout: float,
        auto: tuple[int, int] | None = None,
    ) -> None:
        """``limit``: the fixed cap; or ``auto``: (min, max) of the adaptive one."""
        self.auto = auto
        self.limit = float(limit if auto is None else auto[0])
        self._shared = shared
        self._service = service
        self._key = key(service, "leases")
        self._auto_key = key(service, "auto")
        self._pause_key = key(service, "pause")
        self._ms = int((call_timeout + SLACK_S) * 1000)
        self._acquire = shared.redis.register_script(_ACQUIRE)
        self._release_adjust = shared.redis.register_script(adaptive.RELEASE_ADJUST)
        self._local = adaptive.LocalLimit(self.limit, *auto) if auto else None
        self._numbers = itertools.count()
        self._held = 0  # this worker's calls in flight under the cap
        self._members: set[str] = set()  # its leases in Redis, renewed by the flow thread
        self._cuts: dict[str, int] = {}  # under auto: the limit's cuts each lease was taken at
        self._seen_cuts: int | str = ""  # the cuts of the last lease taken: a local slot's
        self._renew = shared.redis.register_script(_RENEW)
        self._idle: list[str] = []  # leases kept for this worker's next call
        self._unreturned: list[str] = []  # kept leases a tick could not give back
        self._roomy = False  # the cap is far from binding: keep leases (``ROOMY``)
        self._closed = False  # shutting down: keep none
        self._give_back = shared.redis.register_script(_GIVE_BACK)
        self._lock = threading.Lock()
        shared.every_beat(self._renew_held)
        if auto is None:
            shared.every_tick(self._give_back_idle)
        metrics.concurrency_limit.labels(service).set(self.limit)

    def acquire(self) -> str | bool | float | None:
        """A lease (its member), ``None`` for a local slot taken while Redis is down,
        False when the cap is reached, or the seconds a service-wide pause still lasts."""
        with self._lock:
            if self._idle and self._roomy and not self._shared.degraded:
                self._held += 1
                return self._idle.pop()
        member = f"{self._shared.id}:{next(self._numbers)}"
        fixed = 0 if self.auto else int(self.limit)
        start = self.auto[0] if self.auto else 0
        args = [fixed, self._ms, member, start]
        was_down = self._shared.degraded  # then ``run`` may not have sent it at all
        answer = self._shared.run(
            lambda r: self._acquire(
                keys=[self._key, self._auto_key, self._pause_key], args=args, client=r
            )
        )
        with self._lock:
            if answer is DOWN:
                if self.auto is None and not was_down:
                    # Timed out, not refused: the script may still run once Redis answers
                    # again, leaving a lease no call holds. The tick takes it back.
                    self._unreturned.append(member)
                if self._held >= self._shared.local_share(self._service, self.limit):
                    return False
                member = None
            else:
                taken, cap, *rest = answer
                if not taken and rest:
                    return rest[0] / 1000  # seconds of pause left
                if self.auto and cap != math.floor(self.limit):
                    self._set_limit(float(cap))
                if not taken:
                    return False
                self._members.add(member)
                if self.auto:
                    self._cuts[member] = self._seen_cuts = rest[1]
                if rest[0] * ROOMY > cap:
                    self._roomy = False  # only the tick finds room (``_give_back_idle``)
            self._held += 1
        return member

    def release(self, lease: str | None, ok: bool | None = None) -> None:
        """Give the slot back; under ``auto``, with how the call went (``ok``; None: it
        says nothing)."""
        with self._lock:
            self._held -= 1
            held = self._held
            if self._roomy and not self._closed and lease in self._members:
                self._idle.append(lease)  # for the next call (``_give_back_idle``)
                return
            self._members.discard(lease)
            # A slot taken while Redis was down: as taken under the last cuts seen, so that
            # the failures of the calls in flight at an outage's end cut once, not each.
            cuts = self._cuts.pop(lease, "") if lease is not None else self._seen_cuts
        if self.auto is None or ok is None:
            kept = (
                lease is not None and self._shared.run(lambda r: r.zrem(self._key, lease)) is DOWN
            )
            if kept and self.auto is None:  # the tick gives it back (none runs under auto)
                with self._lock:
                    self._unreturned.append(lease)
            return
        low, high = self.auto
        verdict = "1" if ok else "0"
        args = [verdict, low, high, lease or ""]
        args += [adaptive.PROBE_CALLS, adaptive.BACKOFF, adaptive.CLIMB_AFTER, cuts]
        limit = self._shared.run(
            lambda r: self._release_adjust(keys=[self._key, self._auto_key], args=args, client=r)
        )
        if limit is DOWN:
            used = (held + 1) * 2 >= self._shared.local_share(self._service, self.limit)
            limit = self._local.adjust(ok, held, used)
        self._set_limit(float(limit))

    def close(self) -> None:
        """At the worker's shutdown: keep no lease from now on, and give back those kept
        (they would hold their slots until they expire)."""
        with self._lock:
            self._closed, self._roomy = True, False
        self._give_back_idle()

    def _give_back_idle(self) -> None:
        """In the flow thread, every tick: give back the leases kept idle, and see
        whether the cap still has room enough to keep the next ones."""
        with self._lock:
            idle, self._idle = self._unreturned + self._idle, []
            self._unreturned = []
            self._members.difference_update(idle)
            in_use = list(self._members)
        args = [len(idle), *idle, *in_use]
        answer = self._shared.run(
            lambda r: self._give_back(keys=[self._key, self._pause_key], args=args, client=r)
        )
        with self._lock:
            if answer is DOWN:
                self._roomy = False
                self._unreturned += idle  # ZREM again on a tick that reaches Redis (+=: close()
                # and the tick may both be here)
                return
            count, paused, gone = answer
            if gone:  # flushed: such a lease must not start another call uncounted
                lost = {m.decode() for m in gone}
                self._members.difference_update(lost)
                self._idle = [m for m in self._idle if m not in lost]
            self._roomy = (
                not gone and paused <= 0 and count * ROOMY <= self.limit and not self._closed
            )

    def _renew_held(self, client) -> None:
        """In the flow thread, on its heartbeat: keep this worker's leases from expiring
        while their calls (a stream's body) still run."""
        with self._lock:
            members = list(self._members)
        if members:
            self._renew(keys=[self._key], args=[self._ms, *members], client=client)

    def _set_limit(self, limit: float) -> None:
        self.limit = limit
        if self._local is not None and self._local.limit != limit:
            self._local.follow(limit)  # Redis's limit, not the local rule's
        metrics.concurrency_limit.labels(self._service).set(math.floor(limit))

"""``PROXYMQ_MAX_CONCURRENCY=auto``: the cap follows what the service can take (AIMD).

One limit per service in Redis, shared by its workers: each call's outcome adjusts it in
the same script that gives its lease back (no extra round trip), and taking a lease
reads it. The rule (after Netflix's concurrency-limits ``AIMDLimit`` and TCP):

- **slow start**: until the first cut, each success adds 1 / limit (the limit doubles
  every round of calls), so a fresh service reaches its capacity in a few rounds;
- **additive increase** afterwards: each success adds 1 / (``PROBE_CALLS`` * limit), so
  the limit probes one call above what worked about once every ``PROBE_CALLS`` rounds:
  each probe past a service that answers 429 beyond its capacity costs one failed
  call, which is what keeps the failures under 1 %. Once ``CLIMB_AFTER`` rounds have
  passed without a cut, the step grows with the square of the rounds since the cut over
  ``CLIMB_AFTER`` (as CUBIC's probing past the last loss): near a steady capacity the
  next cut comes first, but a service whose capacity came back is found again in about
  half the time (at one call per 20 rounds, the climb back from half of 8 took most of
  the phase ``bench/flow.py --phases`` measured it in);
- only a success while at least half the limit was in use grows it (Netflix's
  ``AIMDLimit`` does the same; TCP's RFC 7661): a quiet service's successes say nothing
  of its capacity, and a limit grown through a quiet hour would let the next burst
  through whole, each call past the capacity a failure. Nor do they count as rounds
  towards the faster probing;
- **multiplicative decrease**: a 429, a 503, a timeout or no answer, or recent calls
  (a running average) slower than ``SLOW`` times the latency floor, cuts it by
  ``BACKOFF`` (or to the calls still in flight, if lower, but never below half), but
  only a call that started after the last cut can cut it again (each cut counts one
  more in the limit's ``cuts``; a lease carries the count it was taken under). The
  failures of the calls in flight at an overshoot come together and are one signal;
  a call started under the new limit that fails is a new one, however soon it comes.
  Counting a round of calls instead (the calls in flight at a cut had to come back
  first) let the fast 429s of new calls make up that round after a service's
  capacity halved: 11 to 15 failed calls each time, most of a run's failures, against
  one per cut.

The latency floor is this worker's (``LatencyFloor``); the limit stays within
``PROXYMQ_MIN_CONCURRENCY`` and ``PROXYMQ_AUTO_MAX_CONCURRENCY``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.flow.gate import CallOutcome

PROBE_CALLS = 30
CLIMB_AFTER = 20  # rounds without a cut after which probing speeds up
BACKOFF = 0.9
SLOW = 2.0
FLOOR_CREEP = 0.01
RECENT_WEIGHT = 0.05
DROPS = frozenset({429, 503, 504})  # and 502 without an answer: see ``verdict``

# Gives a lease back and adjusts the limit. KEYS[1] the leases, KEYS[2] the limit's hash;
# ARGV: ok (1) or drop (0), min, max, the lease ('' for none), PROBE_CALLS, BACKOFF,
# CLIMB_AFTER, the ``cuts`` the lease was taken under ('' for none). A cut goes to
# BACKOFF times the limit, or to the calls still in flight if that is lower (the service
# just refused, or slowed down at, one more than those: one above them would leave a
# floored limit where it was, and every call past it refused until the next cut), but
# never below half the limit. Returns the limit.
RELEASE_ADJUST = """
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[1], ARGV[4]) end
local min, max = tonumber(ARGV[2]), tonumber(ARGV[3])
local limit = tonumber(redis.call('HGET', KEYS[2], 'limit') or min)
local probing = redis.call('HGET', KEYS[2], 'probing')
if ARGV[1] == '1' then
  if (redis.call('ZCARD', KEYS[1]) + 1) * 2 >= limit then
    local since = redis.call('HINCRBY', KEYS[2], 'since_cut', 1)
    if probing then
      local rounds = since / limit / tonumber(ARGV[7])
      limit = limit + math.max(1, rounds ^ 2) / (tonumber(ARGV[5]) * limit)
    else
      limit = limit + 1 / limit
    end
  end
else
  local cuts = tonumber(redis.call('HGET', KEYS[2], 'cuts') or 0)
  local taken = tonumber(ARGV[8]) or math.huge
  if taken >= cuts then
    local busy = redis.call('ZCARD', KEYS[1])
    limit = math.max(math.min(limit * tonumber(ARGV[6]), busy), limit / 2)
    -- past the count this lease was taken under (a Redis gone back to an older count
    -- must not let every lease taken before it cut)
    if taken ~= math.huge and taken > cuts then cuts = taken end
    redis.call('HSET', KEYS[2], 'since_cut', 0, 'probing', 1, 'cuts', cuts + 1)
  end
end
if limit < min then limit = min end
if limit > max then limit = max end
redis.call('HSET', KEYS[2], 'limit', tostring(limit))
redis.call('PEXPIRE', KEYS[2], 3600000)
return tostring(limit)
"""


def probe_step(limit: float, since_cut: int) -> float:
    """What a success adds to the limit after the first cut: one call per
    ``PROBE_CALLS`` rounds, faster with the square of the rounds without a cut over
    ``CLIMB_AFTER`` once there are more (``RELEASE_ADJUST`` does the same in Redis)."""
    rounds = since_cut / limit / CLIMB_AFTER
    return max(1.0, rounds**2) / (PROBE_CALLS * limit)


class LatencyFloor:
    """This worker's fastest recent call time (creeping up towards slower ones, so that
    it follows a service that became slower for good), and a running average of recent
    call times: the latency is rising when the average, not one call, is ``SLOW`` times
    the floor (one slow call on a busy machine says nothing about the service)."""

    def __init__(self) -> None:
        self._floor = 0.0
        self._recent = 0.0
        self._lock = threading.Lock()

    def slow(self, seconds: float) -> bool:
        """Whether recent calls, ``seconds`` the newest, are far above the floor."""
        with self._lock:
            floor = self._floor
            if floor == 0.0 or seconds < floor:
                self._floor = seconds
            else:
                self._floor = floor + FLOOR_CREEP * (seconds - floor)
            self._recent += RECENT_WEIGHT * (seconds - self._recent)
            return floor > 0.0 and self._recent > SLOW * floor


def verdict(outcome: CallOutcome, floor: LatencyFloor) -> bool:
    """True: the call went well (grow); False: cut. Only a call that went well teaches
    the latency floor: a 429 comes back in a millisecond and says nothing of how fast
    the service serves; nor does a stream, whose seconds are its body's."""
    if outcome.status in DROPS or not outcome.answered:
        return False
    return outcome.streamed or not floor.slow(outcome.seconds)


class LocalLimit:
    """The same rule on this worker alone, while Redis cannot be reached, but for which
    failures may cut again: a slot taken then carries no count of cuts, so the calls in
    flight at a cut must come back (be counted back) first, a round of calls."""

    def __init__(self, start: float, low: int, high: int) -> None:
        self.limit = start
        self._low, self._high = low, high
        self._round = self._since_cut = 0
        self._lock = threading.Lock()

    def follow(self, limit: float) -> None:
        """The shared limit Redis answered: the calls counted since this worker's last
        local cut belong to another limit (an earlier outage's) and must not speed up
        the probing from this one."""
        with self._lock:
            self.limit = limit
            self._round = self._since_cut = 0

    def adjust(self, ok: bool, busy: int, used: bool = True) -> float:
        """``busy``: this worker's calls still in flight under the limit; ``used``: they
        and the call that ended were at least half of this worker's share of it."""
        with self._lock:
            if ok and not used:
                return self.limit
            self._since_cut += 1
            if ok:
                self.limit += probe_step(self.limit, self._since_cut)
            elif self._since_cut > self._round:
                self.limit = max(min(self.limit * BACKOFF, busy), self.limit / 2)
                self._round, self._since_cut = busy, 0
            self.limit = min(self._high, max(self._low, self.limit))
            return self.limit

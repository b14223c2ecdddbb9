"""The service-wide rate limit: GCRA (a token bucket kept as one timestamp) in Redis.

Why not the ``limits`` library: its strategies are windows (fixed, moving, sliding
counter), where the burst is the limit itself; ``PROXYMQ_RATE_BURST`` sets a burst
apart from the rate (default one second's worth), which is a token bucket. GCRA keeps
that bucket as one number per service (the theoretical arrival time), updated by one
short script, and says exactly how long until the next call may start, which is when
the worker looks again. ``limits``'s moving window keeps a list entry per call.

While Redis cannot be reached, the same rule runs in the worker on its local share of
the rate and of the burst.

**A rate far from its limit costs no round trip per call.** While the bucket would stay
at least half full, a worker takes in one go as many tokens as it started calls in the
flow thread's last tick (0.2 s), spends them on its next calls, and gives back on the
next tick what it did not spend. A call may so start up to a tick after its token was
taken, in a bucket more than half full: a window may see up to a tick's worth of the
service's calls more than the rule allows (every worker's stock), never more than half
the burst, since a stock is only taken while the bucket stays half full. Near the
limit (and with a burst of 1) every call takes its own token, as before.
"""

from __future__ import annotations

import math
import threading
import time

from proxymq.config import Rate
from workers.flow.shared import DOWN, Shared, key

# KEYS[1] the bucket's TAT; ARGV: interval ms, burst, tokens wanted. Returns {ms to
# wait, as text, 0} or {'0', tokens taken}: those wanted if the bucket stays at least
# half full after them, else 1.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - (burst - 1) * interval - now
if wait > 0 then
  return {tostring(wait), 0}
end
local taken = 1
if want > 1 and burst - (tat - now) / interval - want >= burst / 2 then
  taken = want
end
tat = tat + taken * interval
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
return {'0', taken}
"""

# KEYS[1] the bucket's TAT; ARGV: interval ms, tokens taken and not spent.
_GIVE_BACK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
tat = math.max(now, tat - tonumber(ARGV[1]) * tonumber(ARGV[2]))
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
return 0
"""


class RateLimit:
    def __init__(self, shared: Shared, service: str, rate: Rate, burst: int | None) -> None:
        self.rate = rate
        self.burst = burst or max(1, math.floor(rate.per_second))
        self._shared = shared
        self._service = service
        self._key = key(service, "rate")
        self._interval_ms = 1000 / rate.per_second
        self._take = shared.redis.register_script(_TAKE)
        self._give_back = shared.redis.register_script(_GIVE_BACK)
        self._local_tat = 0.0  # monotonic, for the local share
        self._stock = 0  # tokens taken and not spent yet
        self._started = 0  # calls started since the last tick
        self._want = 1  # tokens to ask for at once: the calls of the last tick
        self._lock = threading.Lock()
        shared.every_tick(self._give_back_stock)

    def take(self) -> float:
        """0.0: a call may start now (its token taken); else seconds to wait."""
        with self._lock:
            if self._stock > 0:
                self._stock -= 1
                self._started += 1
                return 0.0
            want = self._want
        args = [self._interval_ms, self.burst, want]
        answer = self._shared.run(lambda r: self._take(keys=[self._key], args=args, client=r))
        if answer is DOWN:
            return self._take_locally()
        wait, taken = answer
        if float(wait) > 0:
            return float(wait) / 1000
        with self._lock:
            self._stock += int(taken) - 1
            self._started += 1
        return 0.0

    def _give_back_stock(self) -> None:
        """In the flow thread, every tick: give back the tokens not spent, and ask for
        as many at once next time as calls started since the last tick."""
        with self._lock:
            unspent, self._stock = self._stock, 0
            self._want, self._started = max(1, self._started), 0
        if unspent:
            args = [self._interval_ms, unspent]
            self._shared.run(lambda r: self._give_back(keys=[self._key], args=args, client=r))

    def _take_locally(self) -> float:
        workers = self._shared.workers(self._service)
        interval = self._interval_ms / 1000 * workers
        burst = max(1.0, self.burst / workers)
        with self._lock:
            now = time.monotonic()
            tat = max(self._local_tat, now)
            wait = tat - (burst - 1) * interval - now
            if wait > 0:
                return wait
            self._local_tat = tat + interval
            return 0.0

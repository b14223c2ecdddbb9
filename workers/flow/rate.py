"""The service-wide rate limit: GCRA (a token bucket kept as one timestamp) in Redis.

Why not the ``limits`` library: its strategies are windows (fixed, moving, sliding
counter), where the burst is the limit itself; ``PROXYMQ_RATE_BURST`` sets a burst
apart from the rate (default one second's worth), which is a token bucket. GCRA keeps
that bucket as one number per service (the theoretical arrival time), updated by one
short script, and says exactly how long until the next call may start, which is when
the worker looks again. ``limits``'s moving window keeps a list entry per call.

While Redis cannot be reached, the same rule runs in the worker on its local share of
the rate and of the burst.
"""

from __future__ import annotations

import math
import threading
import time

from proxymq.config import Rate
from workers.flow.shared import DOWN, Shared, key

# KEYS[1] the bucket's TAT; ARGV: interval ms, burst. 0: go; else ms to wait.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - (tonumber(ARGV[2]) - 1) * interval - now
if wait > 0 then
  return tostring(wait)
end
tat = tat + interval
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
        self._local_tat = 0.0  # monotonic, for the local share
        self._lock = threading.Lock()

    def take(self) -> float:
        """0.0: a call may start now (its token taken); else seconds to wait."""
        wait = self._shared.run(
            lambda r: self._take(keys=[self._key], args=[self._interval_ms, self.burst], client=r)
        )
        if wait is DOWN:
            return self._take_locally()
        return float(wait) / 1000

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

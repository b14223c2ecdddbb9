"""The retry budget: retries at most ``PROXYMQ_RETRY_BUDGET`` of the service's calls over
the last 10 s (Envoy's retry budget), all its workers together.

Two counters in Redis (``workers.flow.shared``), calls and retries, each a hash of
1 s buckets (field: Redis's ``TIME`` second) over ``WINDOW_S``. Counting every call there
would be one more Redis command per call; instead each worker adds its calls in bunches,
at most every ``FLUSH_S`` (one command per bunch; the flow thread sends what an idle
worker still holds, ``Shared.every_tick``), and a retry asks one script that adds the
calls not sent yet, sums both windows and takes the retry if it fits. The calls a worker
has not sent yet are missing from the others' sums for a fraction of a second: the budget
errs on the side of fewer retries.

While Redis cannot be reached, each worker keeps the budget on its own calls (the same
rule, the same window, in the worker): every worker sees about its share of the calls,
and the ratio is what matters.
"""

from __future__ import annotations

import threading
import time

from workers.flow.shared import DOWN, Shared, key

WINDOW_S = 10
FLUSH_S = 0.1

# KEYS[1] the calls, KEYS[2] the retries (hashes of 1 s buckets). ARGV[1] calls to add,
# ARGV[2] the budget ('' : only add the calls). Returns 1: a retry taken; 0: over budget.
_COUNT = """
local now = tonumber(redis.call('TIME')[1])
local function window(k)
  local total, fields = 0, redis.call('HGETALL', k)
  for i = 1, #fields, 2 do
    if tonumber(fields[i]) <= now - 10 then
      redis.call('HDEL', k, fields[i])
    else
      total = total + tonumber(fields[i + 1])
    end
  end
  return total
end
local function add(k, n)
  redis.call('HINCRBY', k, tostring(now), n)
  redis.call('EXPIRE', k, 11)
end
if tonumber(ARGV[1]) > 0 then add(KEYS[1], tonumber(ARGV[1])) end
local calls = window(KEYS[1])
if ARGV[2] == '' then return 1 end
if window(KEYS[2]) + 1 > tonumber(ARGV[2]) * calls then return 0 end
add(KEYS[2], 1)
return 1
"""


class RetryBudget:
    def __init__(self, budget: float, shared: Shared | None, service: str) -> None:
        self.budget = budget
        self._shared = shared
        self._keys = [key(service, "budget-calls"), key(service, "budget-retries")]
        self._count = None
        if shared is not None:
            self._count = shared.redis.register_script(_COUNT)
            shared.every_tick(self.send)
        self._unsent = 0  # calls not added to Redis yet
        self._sent_at = 0.0  # monotonic
        self._calls = [0] * WINDOW_S  # this worker's, per second, by second % WINDOW_S
        self._retries = [0] * WINDOW_S
        self._second = 0
        self._lock = threading.Lock()

    def called(self) -> None:
        """One attempt made (first or retry): the budget's base."""
        with self._lock:
            self._roll()
            self._calls[self._second % WINDOW_S] += 1
            self._unsent += 1
            now = time.monotonic()
            if self._shared is None or now - self._sent_at < FLUSH_S:
                return
            self._sent_at, unsent, self._unsent = now, self._unsent, 0
        self._run(unsent, "")

    def send(self) -> None:
        """Add the calls not sent yet to the service's count (the flow thread)."""
        with self._lock:
            if not self._unsent:
                return
            self._sent_at, unsent, self._unsent = time.monotonic(), self._unsent, 0
        self._run(unsent, "")

    def spend(self) -> bool:
        """Whether one more retry fits in the budget (and, if so, it is counted)."""
        if self._shared is not None:
            with self._lock:
                self._sent_at, unsent, self._unsent = time.monotonic(), self._unsent, 0
            taken = self._run(unsent, repr(self.budget))
            if taken is not DOWN:
                if taken:
                    self._count_retry()
                return bool(taken)
        with self._lock:
            self._roll()
            if sum(self._retries) + 1 > self.budget * sum(self._calls):
                return False
        self._count_retry()
        return True

    def _run(self, unsent: int, budget: str):
        return self._shared.run(
            lambda r: self._count(keys=self._keys, args=[unsent, budget], client=r)
        )

    def _count_retry(self) -> None:
        """In the local window too, for the fallback while Redis is down."""
        with self._lock:
            self._roll()
            self._retries[self._second % WINDOW_S] += 1

    def _roll(self) -> None:
        """Empty the buckets of the seconds that went by since the last count."""
        now = int(time.monotonic())
        for second in range(max(self._second + 1, now - WINDOW_S + 1), now + 1):
            self._calls[second % WINDOW_S] = self._retries[second % WINDOW_S] = 0
        self._second = max(self._second, now)

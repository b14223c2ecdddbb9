"""What a nacked publish means: a full queue, or a cluster failing over.

RabbitMQ nacks a publish it did not enqueue, so publishing it again cannot duplicate it.
Two causes look the same on the wire:

- the queue is at its length limit (``x-overflow: reject-publish``): the answer is 503
  ``queue-full`` at once, so that load is shed without delay;
- a quorum queue lost its leader, and the channel asked the dead node (RabbitMQ 3.10
  pins the member list per channel, ``proxymq.confirms``): the same publish on a fresh
  channel goes through once the new leader is recorded, about half a second later.

The gateway does not know a queue's limit: it is a worker's per-service setting, and a
passive declare answers only the message count, not the queue's arguments. It tells
the two causes apart by what the broker says about the queue instead:

- A passive declare that fails, or counts 0 messages: the queue is not at a limit
  (ProxyMQ's limits are at least 1, so a full queue holds messages). RabbitMQ 3.10
  counts 0 for a quorum queue whose recorded leader does not answer
  (``rabbit_quorum_queue:stat/2``) and refuses the declare of a classic queue whose
  node is down. The publish is tried again with a short backoff for ``RETRY_FOR``
  seconds, within the request's deadline; a nack that persists is
  ``broker-unavailable``.
- A count above 0: the queue's leader answered. The publish goes again on a channel
  opened after that answer, whose first publish therefore reached a live leader: its
  nack is the queue's own refusal, and the queue is taken as full for ``FULL_FOR``
  seconds (the next nacks are answered at once, without asking again); its ack means
  the first nack was a failover's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent

from proxymq.confirms import NACK

RETRY_FOR = 3.0  # seconds a failover's nacks are retried: an election takes about 0.5 s
FULL_FOR = 1.0  # seconds a queue found full stays full without asking again (Retry-After)
FIRST_BACKOFF, MAX_BACKOFF = 0.05, 0.4

# Publishes the message again and returns its outcome; given a time, on a channel opened
# at or after it (the tracker's clock, time.monotonic).
Republish = Callable[[float | None], str]


class StillRefused(Exception):
    """The broker kept refusing a publish to a queue that is not full."""


class Refusals:
    """Decides what a nack means, with one passive declare per queue at a time."""

    def __init__(
        self, depth: Callable[[str], int | None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``depth(queue)`` is the queue's message count by a passive declare, None when
        the broker does not say."""
        self._depth = depth
        self._clock = clock
        self._checks: dict[str, gevent.Greenlet] = {}
        self._full_at: dict[str, float] = {}

    def after_nack(self, queue: str, republish: Republish, give_up: float) -> str:
        """The outcome of a publish to ``queue`` that was nacked: NACK when the queue is
        full, else the outcome of a retry (ACK, RETURNED); raises ``StillRefused`` when
        the nacks outlast ``RETRY_FOR`` or ``give_up`` (the request's deadline), and
        ``gevent.Timeout`` when the deadline passes while the broker is asked."""
        stop = min(give_up, self._clock() + RETRY_FOR)
        backoff = FIRST_BACKOFF
        while True:
            if self._clock() - self._full_at.get(queue, -FULL_FOR) < FULL_FOR:
                return NACK
            count, answered_at = self._count(queue, give_up - self._clock())
            if count:
                return self._decide(queue, republish(answered_at))
            if stop - self._clock() <= backoff:  # no time left for another try
                raise StillRefused(f"the broker kept refusing the message to {queue!r}")
            gevent.sleep(backoff)
            backoff = min(2 * backoff, MAX_BACKOFF)
            outcome = republish(None)
            if outcome != NACK:
                return outcome

    def _decide(self, queue: str, outcome: str) -> str:
        """A publish on a channel opened after the leader answered: a nack is final."""
        if outcome == NACK:
            self._full_at[queue] = self._clock()
        return outcome

    def _count(self, queue: str, timeout: float) -> tuple[int | None, float]:
        """The queue's message count and when it was answered. Requests nacked at the
        same time share one declare, and so one fresh channel opened after it. Raises
        ``gevent.Timeout`` when the request's deadline comes first."""
        check = self._checks.get(queue)
        if check is None or check.ready():
            check = self._checks[queue] = gevent.spawn(self._answered, queue)
        return check.get(timeout=max(0.0, timeout))

    def _answered(self, queue: str) -> tuple[int | None, float]:
        count = self._depth(queue)
        return count, self._clock()

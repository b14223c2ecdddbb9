"""The closing rule: which waiting requests of a service go in its next call, and when.

Every service has a ``Batcher``; single mode is the rule with a batch size of one (every
request goes at once, up to ``-c`` calls in flight), batch mode the rule with
``batch_size`` and ``batch_concurrency``. All of it runs in the consumer thread.

A batch goes when it is full, when its first request has waited ``batch_wait_ms``, or
when its nearest deadline would otherwise be missed (deadline minus the recent
call time); and when no call of this service is in flight and nothing more is waiting
to be read from the broker, whatever is there goes at once. So a lone request on an idle
worker is not delayed, and under load requests accumulate while a call is in flight and
all go as the next batch when it returns ("continuous batching").

Flow control (``workers.flow``) can hold a service's calls back: while it is paused
(``closed_for``) nothing goes, and a batch its call thread was refused a slot or a token
for comes back (``refused``) to the head of the line. From then on one batch at a time
asks (a probe), when the flow control said to look again or as soon as one of this
service's calls ends (its slot just came back), until one is let through (``admitted``):
the others wait here, their deadlines running, without a call thread.

Why not celery-batches: it does not install with Celery 5.7 (every release pins an older
Celery), and its design is a fixed flush timer that runs whether or not the downstream
is busy, so a lone request always waits out the window.
"""

from __future__ import annotations

import math
import select
import time
from collections import deque
from collections.abc import Callable
from itertools import islice

from proxymq.config import ServiceConfig
from workers.delivery import Delivery

RECHECK_S = 0.001  # bytes still unread: look again this soon
ESTIMATE_WEIGHT = 0.2  # of the newest call time in the running estimate


class Batcher:
    def __init__(
        self,
        service: ServiceConfig,
        calls: int,
        call_after: Callable[[float, Callable[[], None]], object],
        send: Callable[[list[Delivery]], None],
        closed_for: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """``calls``: most calls in flight; ``call_after(seconds, fn)``: the event loop's
        timer; ``send(batch)``: start a call (it must not block); ``closed_for()``:
        seconds before the flow control lets any call start."""
        self.service = service
        self.size = service.batch_size if service.batch_url else 1
        self.calls = calls
        self._call_after = call_after
        self._send = send
        self.waiting: deque[Delivery] = deque()
        self.in_flight = 0
        self._timer = None
        self._timer_at = math.inf
        self._estimate = 0.0  # seconds a call takes, running average
        self._unread: Callable[[], bool] = lambda: False
        self._closed_for = closed_for
        self.held = False  # a batch was refused by the flow control: probe one at a time
        self._probing = False
        self._held_until = 0.0  # monotonic: the next probe not before

    def attach(self, sock) -> None:
        """Read the broker's socket for unread bytes (a fresh one after a reconnect)."""
        self._unread = _unread(sock)

    def add(self, delivery: Delivery) -> None:
        """Wait in line; a priority above the last one's goes ahead of the lower ones
        (the broker already delivers by priority; this orders what it delivered)."""
        priority = _priority(delivery)
        if priority and self.waiting and priority > _priority(self.waiting[-1]):
            ahead = next(i for i, d in enumerate(self.waiting) if _priority(d) < priority)
            self.waiting.insert(ahead, delivery)
        else:
            self.waiting.append(delivery)
        self.pump()

    def call_done(self, seconds: float) -> None:
        self.in_flight -= 1
        self._probing = False  # a probe that asked nothing (its deadlines had passed)
        self._estimate += ESTIMATE_WEIGHT * (seconds - self._estimate)
        if self.held:
            # This call just gave its slot back: ask for it now, not on the poll timer
            # (a freed slot stood idle for a few ms, 13 % of a 50 ms service's capacity).
            self._held_until = 0.0
        self.pump()

    def refused(self, batch: list[Delivery], seconds: float) -> None:
        """The flow control would not let ``batch`` start: it waits at the head of the
        line, and the next one asks after ``seconds``."""
        self.in_flight -= 1
        self.waiting.extendleft(reversed(batch))
        self.held, self._probing = True, False
        self._held_until = time.monotonic() + seconds
        self.pump()

    def admitted(self) -> None:
        """A probe was let through: send as the closing rule says again."""
        if self.held:
            self.held = self._probing = False
            self.pump()

    def drop_waiting(self) -> None:
        """The channel is gone: what waited was never acknowledged and comes back."""
        self.waiting.clear()

    def pump(self) -> None:
        """Send every batch the closing rule allows; arm the timer for the next one."""
        while self.waiting and self.in_flight < self.calls:
            if self._holding():
                return
            close_at = self._close_at()
            now = time.monotonic()
            idle = self.in_flight == 0
            if len(self.waiting) >= self.size or now >= close_at or (idle and not self._unread()):
                batch = [self.waiting.popleft() for _ in range(min(self.size, len(self.waiting)))]
                self.in_flight += 1
                self._probing = self.held
                self._send(batch)
                continue
            self._arm(min(close_at, now + RECHECK_S) if idle else close_at)
            return

    def _holding(self) -> bool:
        """Whether the flow control holds the next batch back (the timer armed for when
        to look again, or for the next deadline among those held)."""
        now = time.monotonic()
        closed = self._closed_for()
        if closed > 0:
            look_at = now + closed
        elif not self.held:
            return False
        elif self._probing:
            look_at = math.inf  # its answer (admitted, refused) pumps again
        elif now < self._held_until:
            look_at = self._held_until
        else:
            return False
        self._let_expired_go(now)
        if self.waiting:
            self._arm(min(look_at, min(d.due for d in self.waiting)))
        return True

    def _let_expired_go(self, now: float) -> None:
        """Held requests whose deadline passed go now, as a batch that calls nobody
        (answered 504): their clients are not kept waiting for the hold to end."""
        expired = [d for d in self.waiting if d.due <= now]
        if expired:
            self.waiting = deque(d for d in self.waiting if d.due > now)
            self.in_flight += 1
            self._send(expired)

    def _close_at(self) -> float:
        """When the next batch must go: its first request's window, or in time for its
        nearest deadline given how long calls take."""
        head = list(islice(self.waiting, self.size))
        window = min(d.taken for d in head) + self.service.batch_wait_ms / 1000
        return min(window, min(d.due for d in head) - self._estimate)

    def _arm(self, at: float) -> None:
        if at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._call_after(max(0.0, at - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self.pump()


def _priority(delivery: Delivery) -> int:
    return (delivery.message.properties or {}).get("priority") or 0


def _unread(sock) -> Callable[[], bool]:
    """Whether the broker has sent bytes not read yet: another request may be about to
    arrive. Only the socket is asked (py-amqp's own read buffer is private); a frame
    already buffered there makes an idle batch go a little early, never late."""

    def unread() -> bool:
        try:
            return bool(sock is not None and select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    return unread

"""Prefetch that follows the free call threads while streams are relayed.

A request is acknowledged when its answer is settled, so the broker's prefetch (Celery's
``-c``, plus the batch services' extra, ``Pipeline.prefetch``) counts the calls in
flight. A stream breaks that: its request is acknowledged as soon as the broker holds
its head (``Pipeline._publish_head``), while its call thread goes on relaying for as
long as the stream lasts. Left alone, the freed prefetch slot brings another request
to this worker, which waits behind the stream while other workers are idle (and misses
its deadline when the stream is long).

``StreamSlots`` takes the slot back: before a stream's request is acknowledged, the
channel's prefetch goes down by one (Celery's ``consumer.qos``, as its own ETA and
autoscale code does), and it goes up again when the stream ends, however it ends. When
a stream takes the last free call thread the prefetch would be 0, which AMQP reads as
"no limit": the worker stops consuming instead, and consumes again when a stream ends.

Everything here runs in the consumer thread. The changes are tied to one connection:
after a reconnect Celery sets its own prefetch again and starts consuming, and a stream
of the old connection that ends later changes nothing. While the worker is not taking
messages (shutting down, reconnecting) nothing is changed and heads are acknowledged
at once.

With quorum queues Celery sets a per-consumer prefetch (``qos_global`` False), which
RabbitMQ fixes when the consumer starts: a later ``basic.qos`` would not reach it. Then
only the stop and the resume apply (docs/streaming.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kombu.common import ignore_errors

log = logging.getLogger(__name__)


class Slot:
    """One stream's hold on a call thread, from its start to its end."""

    __slots__ = ("ended",)

    def __init__(self) -> None:
        self.ended = False


class StreamSlots:
    def __init__(self, consumer, threads: int) -> None:
        """``consumer``: Celery's consumer (``qos``, ``task_consumer``, ``call_soon``);
        ``threads``: the call threads (``-c``)."""
        self._consumer = consumer
        self._threads = threads
        self._held: set[Slot] = set()  # streams acknowledged and still relaying
        self._connection = 0  # which connection the holds belong to
        self._taking = False
        self._paused = False

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def paused(self) -> bool:
        """Whether consuming is stopped because every call thread relays a stream."""
        return self._paused

    def open(self) -> None:
        """A new connection, consuming with Celery's own prefetch: nothing is held."""
        self._connection += 1
        self._held.clear()
        self._taking, self._paused = True, False

    def close(self) -> None:
        """Consuming stopped or the channel is going: hold nothing, change nothing."""
        self._connection += 1
        self._held.clear()
        self._taking, self._paused = False, False

    def acknowledge(self, slot: Slot, ack: Callable[[], None]) -> None:
        """The broker holds ``slot``'s head: take its call thread out of the prefetch,
        then ``ack()`` its request. On the event loop's next turn, not inside the
        confirm being handled: ``basic.qos`` and ``basic.cancel`` wait for their
        answers. The broker applies them before the ack that follows, so the freed
        slot is never filled."""
        if not self._taking or slot.ended:
            ack()
            return
        connection = self._connection
        self._consumer.call_soon(self._hold, slot, ack, connection)

    def release(self, slot: Slot) -> None:
        """``slot``'s stream ended (its relay returned, whichever way): give its call
        thread back to the prefetch."""
        slot.ended = True
        if slot not in self._held:
            return  # not held yet, or held on a connection that is gone
        self._held.discard(slot)
        try:
            if self._paused:
                self._paused = False
                self._consumer.task_consumer.consume()
            else:
                self._shift(+1)
        except Exception as exc:  # the connection went: the reconnect resets it all
            log.warning("could not give a stream's call thread back: %r", exc)

    def _hold(self, slot: Slot, ack: Callable[[], None], connection: int) -> None:
        try:
            if self._taking and not slot.ended and connection == self._connection:
                self._take(slot)
        except Exception as exc:
            log.warning("could not take a stream's call thread out: %r", exc)
        finally:
            ack()

    def _take(self, slot: Slot) -> None:
        if len(self._held) + 1 >= self._threads:
            # The last free call thread: a prefetch of 0 would mean no limit at all.
            self._held.add(slot)
            self._paused = True
            ignore_errors(self._consumer.connection, self._consumer.task_consumer.cancel)
        else:
            self._shift(-1)
            self._held.add(slot)

    def _shift(self, by: int) -> None:
        shift(self._consumer, by)


def shift(consumer, by: int) -> None:
    """Celery's prefetch up or down, now (``qos.update`` sends ``basic.qos``; kombu keeps
    it at least 1, never 0, which AMQP reads as "no limit"). In the consumer thread."""
    if consumer.qos_global is False or by == 0:
        return  # per-consumer prefetch: fixed at basic.consume (quorum queues)
    qos = consumer.qos
    if by > 0:
        qos.increment_eventually(by)
    else:
        qos.decrement_eventually(-by)
    qos.update()

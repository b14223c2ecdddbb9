"""``workers.prefetch.StreamSlots``: no way a stream ends leaves the prefetch lowered
or the worker not consuming, with Celery's own ``QoS`` and a recorded channel. The
paths real processes rarely take (a head confirmed after its stream ended, a stream
that ends before the deferred step, one from before a reconnect) are driven here one by
one; the ordinary ones run against RabbitMQ in tests/integration/test_stream_prefetch.py.
"""

from __future__ import annotations

from kombu.common import QoS

from workers.prefetch import Slot, StreamSlots


class TaskConsumer:
    def __init__(self) -> None:
        self.consuming = True

    def cancel(self) -> None:
        self.consuming = False

    def consume(self) -> None:
        self.consuming = True


class FakeConsumer:
    """Celery's consumer as ``StreamSlots`` uses it: ``qos`` sending ``basic.qos`` (here:
    recorded), ``task_consumer``, ``call_soon`` (run by ``turn``)."""

    def __init__(self, prefetch: int, qos_global: bool = True) -> None:
        self.sent: list[int] = []
        self.qos = QoS(lambda prefetch_count: self.sent.append(prefetch_count), prefetch)
        self.qos.update()
        self.qos_global = qos_global
        self.task_consumer = TaskConsumer()
        self.connection = None
        self._soon: list = []

    def call_soon(self, fn, *args) -> None:
        self._soon.append((fn, args))

    def turn(self) -> None:
        soon, self._soon = self._soon, []
        for fn, args in soon:
            fn(*args)

    @property
    def prefetch(self) -> int:
        return self.sent[-1]


def started(threads: int, prefetch: int, **kwargs) -> tuple[FakeConsumer, StreamSlots, list]:
    consumer = FakeConsumer(prefetch, **kwargs)
    slots = StreamSlots(consumer, threads)
    slots.open()
    return consumer, slots, []


def test_each_stream_lowers_the_prefetch_before_its_ack_and_raises_it_at_its_end():
    consumer, slots, acked = started(threads=3, prefetch=13)
    first, second = Slot(), Slot()
    slots.acknowledge(first, lambda: acked.append((1, consumer.prefetch)))
    assert acked == []  # on the loop's next turn, not inside the confirm
    consumer.turn()
    slots.acknowledge(second, lambda: acked.append((2, consumer.prefetch)))
    consumer.turn()
    assert acked == [(1, 12), (2, 11)]  # lowered before each ack was sent
    slots.release(first)
    slots.release(second)
    assert consumer.sent == [13, 12, 11, 12, 13] and consumer.task_consumer.consuming


def test_the_last_free_call_thread_stops_consuming_instead_of_a_prefetch_of_zero():
    consumer, slots, acked = started(threads=2, prefetch=2)
    first, second = Slot(), Slot()
    slots.acknowledge(first, lambda: acked.append(1))
    consumer.turn()
    slots.acknowledge(second, lambda: acked.append(consumer.task_consumer.consuming))
    consumer.turn()
    assert acked == [1, False] and slots.paused  # cancelled before the ack
    assert consumer.sent == [2, 1]  # never 0 (no limit)
    slots.release(second)
    assert consumer.task_consumer.consuming and consumer.sent == [2, 1]  # one thread free
    slots.release(first)
    assert consumer.sent == [2, 1, 2] and not slots.paused


def test_one_call_thread_stops_and_resumes_consuming_and_leaves_the_prefetch_alone():
    consumer, slots, acked = started(threads=1, prefetch=1)
    slot = Slot()
    slots.acknowledge(slot, lambda: acked.append(1))
    consumer.turn()
    assert not consumer.task_consumer.consuming and acked == [1]
    slots.release(slot)
    assert consumer.task_consumer.consuming and consumer.sent == [1]


def test_a_head_confirmed_after_its_stream_ended_changes_nothing():
    consumer, slots, acked = started(threads=2, prefetch=2)
    slot = Slot()
    slots.release(slot)  # a short stream: its end ran before the head's confirm
    slots.acknowledge(slot, lambda: acked.append(1))
    consumer.turn()
    assert acked == [1] and consumer.sent == [2]


def test_a_stream_that_ends_before_the_deferred_step_changes_nothing():
    consumer, slots, acked = started(threads=2, prefetch=2)
    slot = Slot()
    slots.acknowledge(slot, lambda: acked.append(1))
    slots.release(slot)
    consumer.turn()
    assert acked == [1] and consumer.sent == [2] and consumer.task_consumer.consuming


def test_after_a_reconnect_the_old_connections_streams_change_nothing():
    consumer, slots, acked = started(threads=3, prefetch=3)
    held, pending = Slot(), Slot()
    slots.acknowledge(held, lambda: acked.append(1))
    consumer.turn()
    slots.acknowledge(pending, lambda: acked.append(2))  # its step runs after the reconnect
    slots.close()
    consumer.qos = QoS(lambda prefetch_count: consumer.sent.append(prefetch_count), 3)
    consumer.qos.update()  # Celery's own prefetch on the new connection
    slots.open()
    consumer.turn()
    slots.release(held)
    slots.release(pending)
    assert acked == [1, 2] and consumer.sent == [3, 2, 3]  # 3 after the reconnect: no 4


def test_while_not_taking_messages_heads_are_acknowledged_at_once_and_nothing_changes():
    consumer, slots, acked = started(threads=1, prefetch=1)
    slots.close()  # warm shutdown: the event loop no longer runs deferred steps
    slot = Slot()
    slots.acknowledge(slot, lambda: acked.append(1))
    slots.release(slot)
    assert acked == [1] and consumer.sent == [1] and consumer._soon == []


def test_a_per_consumer_prefetch_is_left_alone_but_consuming_still_stops():
    """Quorum queues: RabbitMQ fixes a consumer's prefetch when it starts consuming."""
    consumer, slots, acked = started(threads=2, prefetch=2, qos_global=False)
    first, second = Slot(), Slot()
    for slot in (first, second):
        slots.acknowledge(slot, lambda: acked.append(1))
        consumer.turn()
    assert consumer.sent == [2] and not consumer.task_consumer.consuming
    slots.release(first)
    slots.release(second)
    assert consumer.sent == [2] and consumer.task_consumer.consuming

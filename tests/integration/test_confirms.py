"""The one confirm tracker (``proxymq.confirms``) against the real broker: many
publishes in flight on one channel, each settled with its own outcome, and a fresh
channel after a nack (the cluster env shows why: tests/cluster/test_quorum_publish.py)."""

from __future__ import annotations

import uuid

import amqp
import kombu
import pytest
from support import BROKER_URL

from proxymq.confirms import ACK, LOST, NACK, RETURNED, ConfirmTracker


@pytest.fixture()
def connection():
    with kombu.Connection(BROKER_URL) as connection:
        connection.connect()
        yield connection.connection  # py-amqp's


def queue(channel, **arguments) -> str:
    name = f"t_confirms_{uuid.uuid4().hex[:8]}"
    channel.queue_declare(name, exclusive=True, arguments=arguments or None)
    return name


def settle_all(connection, tracker: ConfirmTracker, timeout: float = 5) -> None:
    while len(tracker):
        connection.drain_events(timeout=timeout)


def message(correlation_id: str) -> amqp.Message:
    return amqp.Message(b"x", correlation_id=correlation_id)


def test_many_publishes_in_flight_are_each_confirmed(connection):
    channel = connection.channel()
    tracker = ConfirmTracker(connection)
    target = queue(channel)
    outcomes: dict[int, str] = {}
    for i in range(200):
        tracker.publish(target, message(f"c{i}"), lambda o, i=i: outcomes.__setitem__(i, o))

    settle_all(connection, tracker)

    assert outcomes == dict.fromkeys(range(200), ACK)
    assert channel.queue_declare(target, passive=True).message_count == 200


def test_unroutable_mandatory_message_is_returned_and_its_neighbours_acked(connection):
    channel = connection.channel()
    tracker = ConfirmTracker(connection)
    target = queue(channel)
    outcomes: dict[str, str] = {}
    for name, routing_key in (("a", target), ("b", "t_no_such_queue"), ("c", target)):
        tracker.publish(
            routing_key,
            message(name),
            lambda o, n=name: outcomes.__setitem__(n, o),
            mandatory=True,
        )

    settle_all(connection, tracker)

    assert outcomes == {"a": ACK, "b": RETURNED, "c": ACK}


def test_a_full_queue_refuses_with_nack(connection):
    channel = connection.channel()
    tracker = ConfirmTracker(connection)
    target = queue(channel, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    outcomes = []
    for i in range(3):
        tracker.publish(target, message(f"c{i}"), outcomes.append)

    settle_all(connection, tracker)

    assert outcomes == [ACK, NACK, NACK]


def test_a_lost_connection_settles_every_pending_publish_as_lost(connection):
    tracker = ConfirmTracker(connection)
    outcomes = []
    tracker.publish("t_anything", message("c"), outcomes.append)

    tracker.lose_all()

    assert outcomes == [LOST]
    assert len(tracker) == 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_after_a_nack_the_next_publish_goes_on_a_fresh_channel_and_the_old_one_closes(
    connection,
):
    clock = Clock()
    channel = connection.channel()
    tracker = ConfirmTracker(connection, renew_interval=1.0, clock=clock)
    full = queue(channel, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    other = queue(channel)
    outcomes = []
    first, _ = tracker.publish(full, message("a"), outcomes.append)
    tracker.publish(full, message("b"), outcomes.append)
    settle_all(connection, tracker)
    assert outcomes == [ACK, NACK]

    clock.now = 0.5  # within the interval: still the same channel
    held, _ = tracker.publish(other, message("c"), outcomes.append)
    assert held is first
    clock.now = 1.0
    fresh, _ = tracker.publish(other, message("d"), outcomes.append)
    settle_all(connection, tracker)

    assert fresh is not first
    assert outcomes == [ACK, NACK, ACK, ACK]
    assert channel.queue_declare(other, passive=True).message_count == 2
    old = first.channel
    tracker.publish(other, message("e"), outcomes.append)  # closes the idle old channel
    settle_all(connection, tracker)
    while old.connection is not None:  # until the broker's close-ok collects it
        connection.drain_events(timeout=2)
    assert old.channel_id is None
    assert outcomes[-1] == ACK


def test_nacks_renew_the_channel_at_most_once_per_interval(connection):
    clock = Clock()
    channel = connection.channel()
    tracker = ConfirmTracker(connection, renew_interval=1.0, clock=clock)
    full = queue(channel, **{"x-max-length": 0, "x-overflow": "reject-publish"})
    channels = set()
    outcomes = []
    for step in range(8):  # a nack every 0.25 s for 2 s
        clock.now = step * 0.25
        lane, _ = tracker.publish(full, message(f"c{step}"), outcomes.append)
        channels.add(lane.channel)
        settle_all(connection, tracker)

    assert outcomes == [NACK] * 8
    assert len(channels) == 2  # renewed at 1.0 s only (the next is due at 2.0 s)

"""The one confirm tracker (``proxymq.confirms``) against the real broker: many
publishes in flight on one channel, each settled with its own outcome."""

from __future__ import annotations

import uuid

import amqp
import kombu
import pytest
from stack import BROKER_URL

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
    tracker = ConfirmTracker(channel)
    target = queue(channel)
    outcomes: dict[int, str] = {}
    for i in range(200):
        tracker.publish(target, message(f"c{i}"), lambda o, i=i: outcomes.__setitem__(i, o))

    settle_all(connection, tracker)

    assert outcomes == dict.fromkeys(range(200), ACK)
    assert channel.queue_declare(target, passive=True).message_count == 200


def test_unroutable_mandatory_message_is_returned_and_its_neighbours_acked(connection):
    channel = connection.channel()
    tracker = ConfirmTracker(channel)
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
    tracker = ConfirmTracker(channel)
    target = queue(channel, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    outcomes = []
    for i in range(3):
        tracker.publish(target, message(f"c{i}"), outcomes.append)

    settle_all(connection, tracker)

    assert outcomes == [ACK, NACK, NACK]


def test_a_lost_connection_settles_every_pending_publish_as_lost(connection):
    tracker = ConfirmTracker(connection.channel())
    outcomes = []
    tracker.publish("t_anything", message("c"), outcomes.append)

    tracker.lose_all()

    assert outcomes == [LOST]
    assert len(tracker) == 0

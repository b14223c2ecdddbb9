"""The worker's batch reply path (``Publisher.reply_many``) against the real broker:
many replies, one wait for their confirms, each outcome reported per reply."""

from __future__ import annotations

import socket
import uuid

import kombu
import pytest
from stack import BROKER_URL

from proxymq.envelope import ReplyEnvelope, decode_reply
from workers.publisher import Publisher


@pytest.fixture()
def publisher():
    publisher = Publisher(BROKER_URL, pool_size=2)
    yield publisher
    publisher.close()


@pytest.fixture()
def channel():
    with kombu.Connection(BROKER_URL) as connection:
        yield connection.default_channel


def reply_queue(channel, **arguments) -> str:
    name = f"t_replies_{uuid.uuid4().hex[:8]}"
    channel.queue_declare(name, exclusive=True, arguments=arguments or None)
    return name


def drain(channel, queue: str) -> list[tuple[str, ReplyEnvelope]]:
    got = []
    while (message := channel.basic_get(queue, no_ack=True)) is not None:
        got.append((message.properties["correlation_id"], decode_reply(message.body)))
    return got


def test_a_batch_of_replies_is_confirmed_and_each_reaches_its_own_queue(publisher, channel):
    first, second = reply_queue(channel), reply_queue(channel)
    replies = [
        (
            first if i % 2 else second,
            f"cid-{i}",
            ReplyEnvelope(200, [("X-I", str(i))], b"\x00%d" % i),
        )
        for i in range(20)
    ]

    assert publisher.reply_many(replies) == [True] * 20

    expected = {queue: [(c, r) for q, c, r in replies if q == queue] for queue in (first, second)}
    assert drain(channel, first) == expected[first]
    assert drain(channel, second) == expected[second]


def test_a_reply_the_broker_refuses_is_reported_and_the_others_confirmed(publisher, channel):
    full = reply_queue(channel, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    roomy = reply_queue(channel)
    replies = [
        (full, "a", ReplyEnvelope(200)),
        (full, "b", ReplyEnvelope(200)),
        (roomy, "c", ReplyEnvelope(200)),
    ]

    assert publisher.reply_many(replies) == [True, False, True]
    assert [c for c, _ in drain(channel, full)] == ["a"]
    assert [c for c, _ in drain(channel, roomy)] == ["c"]


def test_many_batches_in_a_row_are_all_confirmed(publisher, channel):
    # Confirms of earlier replies arrive while later ones are still being published.
    queue = reply_queue(channel)
    for batch in range(100):
        replies = [(queue, f"{batch}-{i}", ReplyEnvelope(200, [], b"x" * 100)) for i in range(16)]
        assert publisher.reply_many(replies) == [True] * 16
    assert len(drain(channel, queue)) == 1600


def test_a_reply_connection_the_broker_dropped_is_replaced(publisher, channel):
    queue = reply_queue(channel)
    assert publisher.reply_many([(queue, "before", ReplyEnvelope(200))]) == [True]
    # The idle pooled connection dies under the publisher, as after a broker restart.
    pooled = publisher._confirming.queue[0]
    pooled._connection.connection.sock.shutdown(socket.SHUT_RDWR)

    assert publisher.reply_many([(queue, "after", ReplyEnvelope(200))]) == [True]
    assert [c for c, _ in drain(channel, queue)] == ["before", "after"]


def test_a_reply_connection_idle_too_long_is_replaced_not_trusted(publisher, channel, monkeypatch):
    # Reply connections have no heartbeats: one idle past the limit may be dead silently.
    queue = reply_queue(channel)
    assert publisher.reply_many([(queue, "first", ReplyEnvelope(200))]) == [True]
    idle = publisher._confirming.queue[0]
    monkeypatch.setattr("workers.publisher.IDLE_LIMIT_S", 0.0)

    assert publisher.reply_many([(queue, "second", ReplyEnvelope(200))]) == [True]
    assert publisher._confirming.queue[0] is not idle
    assert [c for c, _ in drain(channel, queue)] == ["first", "second"]

"""A publisher's channel survives the loss of its quorum queue's leader (proxymq.confirms).

RabbitMQ 3.10 pins a quorum queue's member list in each channel when the channel first
publishes to it, leader first as the queue's record names it. A channel that first
publishes right after the leader's node died, before a new leader is recorded, asks the
dead node first and nacks every publish for as long as that node is down: a gateway that
reconnected from that very node answered 503 to everything until the end of a test run.
The tracker moves to a fresh channel after a nack, which reads the record again.
"""

from __future__ import annotations

import json
import time
import uuid

import amqp
import kombu

from proxymq.confirms import ACK, NACK, ConfirmTracker


def test_a_channel_opened_as_the_leader_dies_publishes_again_once_a_new_leader_is_elected(
    cluster,
):
    leader, survivor = cluster.nodes[0], cluster.nodes[1]
    queue = f"t_qq_{uuid.uuid4().hex[:8]}"
    with kombu.Connection(leader.url) as declaring:
        declaring.default_channel.queue_declare(
            queue, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
        )
    rows = json.loads(leader.ctl("list_queues", "name", "leader", "--formatter", "json"))
    assert {"name": queue, "leader": leader.name} in rows
    with kombu.Connection(survivor.url) as kombu_connection:
        kombu_connection.connect()
        connection = kombu_connection.connection
        try:
            killed_at = time.monotonic()
            leader.kill()
            # What a gateway does when its node dies: a new channel, publishing at once.
            tracker = ConfirmTracker(connection, renew_interval=0.5)
            outcomes: list[tuple[float, str]] = []
            while time.monotonic() - killed_at < 20 and not outcomes_end_in_acks(outcomes):
                tracker.publish(
                    queue,
                    amqp.Message(b"x"),
                    lambda outcome: outcomes.append((time.monotonic() - killed_at, outcome)),
                )
                while len(tracker):
                    connection.drain_events(timeout=5)
                time.sleep(0.1)
            print(f"\n[cluster] publishes after the leader's node died: {outcomes}")
            assert outcomes[0][1] == NACK, "the broker did not refuse: the case is not reproduced"
            assert outcomes_end_in_acks(outcomes), "still refused 20 s after the leader died"
            first_ack = next(at for at, outcome in outcomes if outcome == ACK)
            assert first_ack < 10
            _, count, _ = kombu_connection.default_channel.queue_declare(queue, passive=True)
            assert count == sum(1 for _, outcome in outcomes if outcome == ACK)
        finally:
            cluster.restart(leader)
            kombu_connection.default_channel.queue_delete(queue)


def outcomes_end_in_acks(outcomes: list[tuple[float, str]], n: int = 5) -> bool:
    return len(outcomes) >= n and all(outcome == ACK for _, outcome in outcomes[-n:])

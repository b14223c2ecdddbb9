"""A publisher's channel survives the loss of its quorum queue's leader (proxymq.confirms).

RabbitMQ 3.10 pins a quorum queue's member list in each channel when the channel first
publishes to it, leader first as the queue's record names it. A channel that first
publishes right after the leader's node died, before a new leader is recorded, asks the
dead node first and nacks every publish for as long as that node is down: a gateway that
reconnected from that very node answered 503 to everything until the end of a test run.
The tracker moves to a fresh channel after a nack, which reads the record again, and
the gateway publishes a nacked request again on it (gateway/refusals.py).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter

import amqp
import kombu
import requests
from support import Stack, unique_service, wait_for

from proxymq.config import ServiceConfig
from proxymq.confirms import ACK, NACK, ConfirmTracker
from workers.app import service_queue


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


def test_a_request_published_as_the_leader_dies_is_answered_after_a_retry_not_queue_full(
    cluster, downstream
):
    """A gateway on a survivor whose channel first publishes to the queue right after
    the leader's node died, before a new leader is recorded (as one that reconnected
    from the dead node does): RabbitMQ nacks, and the gateway answered 503
    ``queue-full`` for a queue without a limit. It now publishes again on a fresh
    channel within the deadline, and the request is answered."""
    leader, survivor = cluster.nodes[0], cluster.nodes[1]
    service = unique_service("qqgw")
    config = ServiceConfig(service, downstream.url, queue_type="quorum")
    probe = f"t_qq_{uuid.uuid4().hex[:8]}"  # nobody consumes it
    # Declared on node 0, the request queue as the worker declares it, so that node 0
    # holds both leaders.
    with kombu.Connection(leader.url) as declaring:
        service_queue(config)(declaring.default_channel).declare()
        declaring.default_channel.queue_declare(
            probe, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
        )
    rows = json.loads(leader.ctl("list_queues", "name", "leader", "--formatter", "json"))
    assert {"name": config.queue, "leader": leader.name} in rows
    stack = Stack()
    try:
        stack.worker(
            service,
            downstream.url,
            PROXYMQ_BROKER_URL=cluster.urls(2),
            PROXYMQ_QUEUE_TYPE="quorum",
            wait=False,
        )
        wait_for(lambda: _consumers(cluster, config.queue) == 1, 60, "the worker consuming")
        gateway = stack.gateway(PROXYMQ_BROKER_URL=cluster.urls(1))
        path = f"/calls-of-{service}"  # tells this test's calls from other tests'
        load = _Clients(f"{gateway.url}/{service}{path}", 8)
        with kombu.Connection(survivor.url) as probing:
            probing.connect()
            killed_at = time.monotonic()
            leader.kill()
            load.start()
            # The same case on a channel of the test's own, on the gateway's node.
            probed = _publish_once(probing.connection, probe)
        wait_for(lambda: load.started_since(killed_at + 3) >= 8, 60, "requests 3 s on")
        answers = load.stop(killed_at)
        print(f"\n[cluster] probe: {probed}; gateway answers after the kill: {answers}")
        assert probed == NACK, "the broker did not refuse: the case is not reproduced"
        refused = [answer for answer in answers if answer[1] != 200]
        assert not refused, f"{len(refused)} not answered 200, e.g. {refused[:5]}"
        # A nacked publish was not enqueued: publishing it again made no second call.
        calls = Counter(
            dict(seen.headers).get("X-Correlation-Id")
            for seen in list(downstream.seen)
            if seen.raw_uri == path
        )
        assert sum(calls.values()) == len(answers)
        assert [cid for cid, n in calls.items() if n > 1] == []
    finally:
        stack.stop()
        cluster.restart(leader)
        with kombu.Connection(survivor.url) as connection:
            connection.default_channel.queue_delete(config.queue)
            connection.default_channel.queue_delete(probe)


def _publish_once(connection: amqp.Connection, queue: str) -> str:
    """One publish on a new channel; its outcome."""
    tracker = ConfirmTracker(connection)
    outcomes: list[str] = []
    tracker.publish(queue, amqp.Message(b"probe"), outcomes.append)
    while not outcomes:
        connection.drain_events(timeout=5)
    return outcomes[0]


class _Clients:
    """Threads posting one request at a time, each recording (started, status, error)."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.answers: list[tuple[float, int, str | None]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._post, daemon=True) for _ in range(count)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def started_since(self, since: float) -> int:
        return sum(1 for started, _, _ in self.answers if started >= since)

    def stop(self, since: float) -> list[tuple[float, int, str | None]]:
        """The answers, with their start in seconds from ``since``."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(20)
        return [(round(at - since, 2), status, error) for at, status, error in self.answers]

    def _post(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                response = requests.post(
                    self.url, data=b"x", headers={"X-ProxyMQ-Timeout": "10"}, timeout=15
                )
            except requests.RequestException as exc:
                self.answers.append((started, 0, repr(exc)))
                continue
            error = response.headers.get("X-ProxyMQ-Error")
            self.answers.append((started, response.status_code, error))


def _consumers(cluster, queue: str) -> int:
    with kombu.Connection(cluster.url, connect_timeout=2) as connection:
        _, _, count = connection.default_channel.queue_declare(queue, passive=True)
        return count

"""``deadletters replay`` on a cluster: quorum dead letters replayed through the failover
list while the list's first node is dead."""

from __future__ import annotations

import subprocess
import time

import kombu
from poison_requests import publish_poison
from support import BIN, ROOT, Downstream, Stack, base_env, unique_service, wait_for


def ready(url: str, queue: str) -> int:
    with kombu.Connection(url) as connection:
        return connection.default_channel.queue_declare(queue, passive=True).message_count


def test_quorum_dead_letters_are_replayed_through_the_list_while_its_first_node_is_dead(
    cluster,
):
    service = unique_service("cdead")
    stack = Stack()
    first, survivor = cluster.nodes[0], cluster.nodes[1]
    try:
        with Downstream() as downstream:
            worker = stack.worker(
                service,
                downstream.url,
                wait=False,
                PROXYMQ_BROKER_URL=cluster.url,
                PROXYMQ_QUEUE_TYPE="quorum",
            )
            wait_for(lambda: _consumers(survivor.url, f"{service}_requests") == 1, 60, "worker")
            ids = publish_poison(service, 3, url=survivor.url)
            dead = f"{service}_requests.dead"
            wait_for(lambda: ready(survivor.url, dead) == 3, 30, "three dead letters")
            worker.stop()
            first.kill()
            started = time.monotonic()

            def replayed() -> bool:
                done = subprocess.run(
                    [str(BIN / "celery"), "-A", "workers", "deadletters", "replay", service],
                    cwd=ROOT,
                    env=base_env(PROXYMQ_BROKER_URL=cluster.url),
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                return done.returncode == 0 and ready(survivor.url, dead) == 0

            # Until the quorum queues have a leader again, the replay may be refused
            # (and keeps every dead letter); then it goes through.
            wait_for(replayed, 90, "the replay through the list", interval=2)
            print(f"\n[cluster] replayed {time.monotonic() - started:.1f} s after the kill")
            with kombu.Connection(survivor.url) as connection:
                bound = kombu.Queue(f"{service}_requests", no_declare=True)(connection.channel())
                moved = []
                while (message := bound.get(no_ack=True)) is not None:
                    moved.append(message.properties["correlation_id"])
            assert sorted(moved) == sorted(ids)
    finally:
        stack.stop()
        if not first.running():
            cluster.restart(first)
        with kombu.Connection(survivor.url) as connection:
            for queue in (f"{service}_requests", f"{service}_requests.dead"):
                connection.channel().queue_delete(queue)


def _consumers(url: str, queue: str) -> int:
    with kombu.Connection(url) as connection:
        return connection.default_channel.queue_declare(queue, passive=True).consumer_count

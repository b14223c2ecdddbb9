"""Flower given the cluster's nodes as a ``;`` list follows its node's loss (issue: cluster).

Flower reads task events over its own broker connection (``celery -A workers flower``,
the same Celery app as the workers, so the same failover list). Its node is killed; the
tasks of requests sent afterwards must still reach its task list, through another node.
"""

from __future__ import annotations

import time

import kombu
import kombu.exceptions
import psutil
import pytest
import requests
from support import Stack, free_port, unique_service, wait_for


@pytest.fixture()
def system(cluster, downstream):
    """A worker and a gateway listing node 1 first, Flower listing node 0 first."""
    service = unique_service("flowerha")
    stack = Stack()
    try:
        stack.worker(service, downstream.url, wait=False, PROXYMQ_BROKER_URL=cluster.urls(1))
        wait_for(lambda: consuming(cluster, f"{service}_requests"), 60, "the worker consuming")
        gateway = stack.gateway(PROXYMQ_BROKER_URL=cluster.urls(1))
        port = free_port()
        flower = stack.run(
            "flower",
            ["celery", "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1"],
            FLOWER_UNAUTHENTICATED_API="true",
            PROXYMQ_BROKER_URL=cluster.urls(0),
        )
        yield service, gateway, flower, f"http://127.0.0.1:{port}"
    finally:
        stack.stop()


def consuming(cluster, queue: str) -> bool:
    with kombu.Connection(cluster.url, connect_timeout=2) as connection:
        try:
            _, _, consumers = connection.default_channel.queue_declare(queue, passive=True)
        except kombu.exceptions.OperationalError:
            return False
        return consumers > 0


def tasks(flower_url: str) -> dict:
    response = requests.get(flower_url + "/api/tasks", timeout=10)
    response.raise_for_status()
    return response.json()


def send(gateway, service: str) -> str:
    response = requests.post(f"{gateway.url}/{service}/echo", data=b"x", timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["X-Correlation-ID"]


def until_listed(gateway, service: str, flower, url: str, timeout: float, what: str) -> None:
    """Send requests until Flower lists one of them. Events published while Flower has no
    event queue are not kept for it (its first, and after a node's loss the old one, which
    was auto-delete on the dead node), so one request would not tell."""
    sent: list[str] = []

    def one_listed() -> bool:
        sent.append(send(gateway, service))
        listed = tasks(url)
        return any(task_id in listed for task_id in sent)

    try:
        wait_for(lambda: flower.alive() and one_listed(), timeout, what, 0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}:\n{flower.log()[-4000:]}") from None


def broker_node(cluster, pid: int) -> set:
    """The nodes a process (and its children) is connected to."""
    ports = {node.port: node for node in cluster.nodes}
    process = psutil.Process(pid)
    connected = {
        ports[c.raddr.port]
        for p in (process, *process.children(recursive=True))
        for c in p.net_connections("tcp")
        if c.raddr and c.raddr.port in ports and c.status == psutil.CONN_ESTABLISHED
    }
    return connected


def test_flower_sees_new_tasks_within_seconds_after_its_node_is_killed(cluster, system):
    service, gateway, flower, url = system
    until_listed(gateway, service, flower, url, 60, "Flower to list a task")
    (node,) = broker_node(cluster, flower.pid)
    assert node is cluster.nodes[0]
    try:
        killed_at = time.monotonic()
        node.kill()
        until_listed(gateway, service, flower, url, 20, "a task sent after the kill listed")
        after = time.monotonic() - killed_at
        print(f"\n[cluster] Flower listed a task sent after its node's kill {after:.1f} s after it")
        assert node not in broker_node(cluster, flower.pid)
        assert flower.alive()
    finally:
        cluster.restart(node)

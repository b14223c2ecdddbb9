"""Flower, started as users start it (``celery -A workers flower``), shows ProxyMQ.

A real worker and gateway serve a fresh service; Flower is read through its HTTP API:
the worker is listed with its queue and the ``proxymq.forward`` task, every request sent
through the gateway is a task whose id is the gateway's ``X-Correlation-ID``, in state
SUCCESS, with ``METHOD /service/path`` as its arguments and never the body. Flower runs
with ``--enable_events=False`` so that the task states it shows come from the workers'
own ``worker_send_task_events``, not from Flower switching events on. The broker tab
(``--broker_api``) shows the service queue's depth when RabbitMQ's management API is up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from urllib.parse import urlparse

import pytest
import requests
from support import BROKER_URL, Gateway, Process, free_port, wait_for

SECRET = "do-not-show-this-body-9f1c2e"


def management_api() -> str:
    host = urlparse(BROKER_URL).hostname or "127.0.0.1"
    return os.environ.get("PROXYMQ_TEST_BROKER_API", f"http://guest:guest@{host}:15672/api/")


def management_up() -> bool:
    try:
        return requests.get(management_api() + "overview", timeout=2).ok
    except requests.RequestException:
        return False


def ensure_management() -> str | None:
    """None when the management API answers, else why not (the broker tab is skipped).

    On a local broker whose management plugin is installed but off (Debian's
    rabbitmq-server ships it), it is switched on, as ``scripts/broker`` does.
    """
    if management_up():
        return None
    local = urlparse(BROKER_URL).hostname in ("127.0.0.1", "localhost")
    if local and shutil.which("rabbitmq-plugins"):
        subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_management"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        try:
            wait_for(management_up, 60, "the RabbitMQ management API", 0.5)
            return None
        except TimeoutError:
            pass
    return f"RabbitMQ's management API does not answer at {management_api()}"


class Flower:
    def __init__(self, process: Process, url: str) -> None:
        self.process = process
        self.url = url

    def get(self, path: str, **params):
        response = requests.get(self.url + path, params=params, timeout=10)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def worker(stack, downstream, service) -> str:
    process = stack.worker(service, downstream.url)
    return process.args[process.args.index("-n") + 1].split("@")[0]


@pytest.fixture(scope="module")
def gateway(stack, worker) -> Gateway:
    return stack.gateway()


@pytest.fixture(scope="module")
def flower(stack, worker) -> Flower:
    port = free_port()
    process = stack.run(
        "flower",
        [
            "celery",
            "-A",
            "workers",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--broker_api={management_api()}",
            "--enable_events=False",
        ],
        FLOWER_UNAUTHENTICATED_API="true",
    )
    flower = Flower(process, f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: process.alive() and flower.get("/api/workers") is not None, 30, "Flower")
        # Flower knows the worker from its heartbeat events: its event consumer is running,
        # so the task events of the requests below reach it.
        wait_for(
            lambda: any(
                name.split("@")[0] == worker and alive
                for name, alive in flower.get("/api/workers", status="true").items()
            ),
            30,
            "Flower to receive the worker's heartbeat",
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}:\n{process.log()[-4000:]}") from None
    return flower


def worker_info(flower: Flower, worker: str) -> tuple[str, dict]:
    workers = flower.get("/api/workers", refresh="true")
    matches = [(name, info) for name, info in workers.items() if name.split("@")[0] == worker]
    assert matches, f"worker {worker} not in Flower's list: {sorted(workers)}"
    return matches[0]


def test_flower_lists_the_worker_with_its_queue_and_task(flower, worker, service):
    _, info = worker_info(flower, worker)
    assert f"{service}_requests" in [queue["name"] for queue in info["active_queues"]]
    assert "proxymq.forward" in info["registered"]
    assert info["stats"]["pool"]["max-concurrency"] > 1  # many downstream calls at once


def test_requests_are_tasks_with_their_correlation_ids_and_no_body(
    flower, gateway, worker, service
):
    sent = {}
    for i, method in enumerate(["POST", "PUT", "DELETE"]):
        path = f"/{service}/items/{i}"
        response = requests.request(method, gateway.url + path + "?q=1", data=SECRET, timeout=30)
        assert response.status_code == 200, response.text
        assert response.content == SECRET.encode()
        sent[response.headers["X-Correlation-ID"]] = f"{method} {path}"

    def tasks() -> dict:
        return flower.get("/api/tasks", taskname="proxymq.forward")

    wait_for(
        lambda: all(tasks().get(tid, {}).get("state") == "SUCCESS" for tid in sent),
        30,
        "Flower to show the requests' tasks as SUCCESS",
    )
    listed = tasks()
    worker_name, _ = worker_info(flower, worker)
    for task_id, args in sent.items():
        task = listed[task_id]
        assert task["uuid"] == task_id
        assert task["name"] == "proxymq.forward"
        assert task["args"] == args
        assert task["kwargs"] == "{}"
        assert task["worker"] == worker_name
        assert task["received"] and task["started"] and task["succeeded"]
        info = flower.get(f"/api/task/info/{task_id}")
        assert info["state"] == "SUCCESS"
        assert info["args"] == args
        assert SECRET not in json.dumps(info)
    assert SECRET not in json.dumps(listed)
    # The task's own page (rendered by Flower from the same state) shows it too.
    page = requests.get(flower.url + f"/task/{next(iter(sent))}", timeout=10)
    assert page.ok and "proxymq.forward" in page.text and SECRET not in page.text


def test_broker_tab_shows_the_service_queue_depth(flower, gateway, service, downstream):
    reason = ensure_management()
    if reason:
        pytest.skip(reason)
    queue = f"{service}_requests"

    def depth() -> int:
        queues = flower.get("/api/queues/length")["active_queues"]
        return next((q.get("messages", 0) for q in queues if q["name"] == queue), -1)

    wait_for(lambda: depth() == 0, 30, f"Flower to list {queue} (empty)", 0.5)

    # The downstream holds the requests until Flower has shown them: they stay in the queue
    # (unacknowledged, with the worker) for as long as the management API's statistics,
    # refreshed every 5 s and later on a loaded machine, take to count them.
    statuses: list[int] = []

    def call() -> None:
        url = f"{gateway.url}/{service}/hold"
        statuses.append(requests.get(url, timeout=90).status_code)

    downstream.release.clear()
    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: depth() == 3, 45, f"Flower to show 3 messages in {queue}", 0.5)
        page = requests.get(flower.url + "/broker", timeout=10)
        assert page.ok and queue in page.text
    finally:
        downstream.release.set()
        for thread in threads:
            thread.join(90)
    assert statuses == [200, 200, 200]

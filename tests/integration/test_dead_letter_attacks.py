"""Attacks on ``celery -A workers deadletters``: a replay whose copies die again at once,
and pacing values that would hold the dead letters for ever."""

import subprocess
import threading
import time
import uuid

import kombu
import pytest
from poison_requests import publish_poison
from support import (
    BIN,
    BROKER_URL,
    ROOT,
    base_env,
    delete_queues,
    free_port,
    unique_service,
    wait_for,
)
from test_dead_letters import RESULT_URL, correlation_ids, dead_count, deadletters

from proxymq.envelope import DELIVERIES_HEADER, RequestEnvelope, task_message
from proxymq.jobs import JobStore, new_job_id


@pytest.fixture
def three_dead(stack, downstream):
    """A service with 3 dead letters; its worker stopped (the queues stay)."""
    service = unique_service("deadatk")
    worker = stack.worker(service, downstream.url)
    publish_poison(service, 3)
    wait_for(lambda: dead_count(service) == 3, 30, "three dead letters")
    worker.stop()
    yield service
    delete_queues(f"{service}_requests", f"{service}_requests.dead")


class DeadLetteringAtOnce:
    """What a worker does with a request that kills it every time: each copy on
    ``<service>_requests`` goes straight back to ``<service>_requests.dead``."""

    def __init__(self, service: str) -> None:
        self.service, self.moved = service, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with kombu.Connection(BROKER_URL) as connection:
            channel = connection.channel()
            producer = kombu.Producer(channel)
            queue = kombu.Queue(f"{self.service}_requests", no_declare=True)(channel)
            while not self._stop.is_set():
                message = queue.get(no_ack=False)
                if message is None:
                    self._stop.wait(0.005)
                    continue
                producer.publish(
                    message.body,
                    routing_key=f"{self.service}_requests.dead",
                    headers=message.headers,
                    serializer=None,
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    correlation_id=message.properties["correlation_id"],
                )
                message.ack()
                self.moved += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_replay_takes_each_dead_letter_once_even_when_its_copy_dies_again_at_once(
    three_dead,
):
    mover = DeadLetteringAtOnce(three_dead)
    try:
        replayed = deadletters("replay", three_dead, "--rate", "20", timeout=60)
    finally:
        mover.stop()
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 3 dead letters" in replayed.stdout
    assert mover.moved == 3
    assert dead_count(three_dead) == 3  # back where they were: a later replay may retry


@pytest.mark.parametrize("rate", ["nan", "-1", "0"])
def test_a_rate_that_paces_nothing_is_refused_before_anything_is_taken(three_dead, rate):
    refused = deadletters("replay", three_dead, "--rate", rate, timeout=30)
    assert refused.returncode == 2, refused.stdout
    assert "--rate" in refused.stderr
    assert dead_count(three_dead) == 3


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_a_limit_below_one_is_refused(three_dead, limit):
    refused = deadletters("replay", three_dead, "--limit", limit, timeout=30)
    assert refused.returncode == 2, refused.stdout
    assert dead_count(three_dead) == 3


def test_a_huge_limit_and_rate_replay_everything(three_dead):
    replayed = deadletters("replay", three_dead, "--limit", str(2**70), "--rate", "1e308")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 3 dead letters" in replayed.stdout
    assert dead_count(three_dead) == 0


def test_replay_as_jobs_with_the_result_store_down_is_one_line_and_keeps_them(three_dead):
    port = free_port()  # nothing listens there: Redis is "down"
    refused = deadletters(
        "replay", three_dead, "--as-jobs", PROXYMQ_RESULT_URL=f"redis://127.0.0.1:{port}/0"
    )
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), refused.stderr
    assert "PROXYMQ_RESULT_URL" in lines[0]
    assert dead_count(three_dead) == 3


def test_a_plain_replay_of_a_dead_lettered_job_reaches_the_downstream(stack, downstream):
    """The job's record holds its poison answer (done): replayed as the same job, the
    worker would skip it as finished, and the replay would do nothing at all."""
    service = unique_service("deadjobplain")
    worker = stack.worker(service, downstream.url, PROXYMQ_RESULT_URL=RESULT_URL)
    correlation_id = str(uuid.uuid4())
    deadline = int(time.time() * 1000) + 60_000
    job_id = new_job_id()
    JobStore(RESULT_URL, 60).create(job_id, correlation_id, service, "", deadline)
    request = RequestEnvelope(service, "POST", "/x", None, [], b"poison", deadline, job=True)
    body, headers, properties = task_message(request, correlation_id, None)
    with kombu.Connection(BROKER_URL, transport_options={"confirm_publish": True}) as connection:
        connection.Producer().publish(
            body,
            routing_key=f"{service}_requests",
            headers={**headers, DELIVERIES_HEADER: 4},  # past PROXYMQ_MAX_DELIVERIES
            serializer=None,
            content_type=properties["content_type"],
            content_encoding=properties["content_encoding"],
            correlation_id=correlation_id,
        )
    try:
        wait_for(lambda: dead_count(service) == 1, 30, "the dead-lettered job")
        replayed = deadletters("replay", service)
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 1 dead letters" in replayed.stdout
        wait_for(lambda: downstream.requests_for(correlation_id), 20, "the replayed request")
    finally:
        worker.stop()
        delete_queues(f"{service}_requests", f"{service}_requests.dead")


def test_two_replays_at_once_copy_each_dead_letter_once(stack, downstream):
    service = unique_service("deadtwice")
    worker = stack.worker(service, downstream.url)
    ids = publish_poison(service, 60)
    wait_for(lambda: dead_count(service) == 60, 60, "60 dead letters")
    worker.stop()
    try:
        command = [str(BIN / "celery"), "-A", "workers", "deadletters", "replay", service]
        runs = [
            subprocess.Popen([*command, "--rate", "100"], cwd=ROOT, env=base_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]  # fmt: skip
        outputs = [run.communicate(timeout=60) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        moved = correlation_ids(f"{service}_requests")
        assert len(moved) == len(set(moved)) == 60
        assert set(moved) == set(ids)
        assert dead_count(service) == 0
    finally:
        delete_queues(f"{service}_requests", f"{service}_requests.dead")


def test_a_purge_racing_a_replay_leaves_each_dead_letter_copied_once_or_purged(stack, downstream):
    service = unique_service("deadrace")
    worker = stack.worker(service, downstream.url)
    ids = publish_poison(service, 60)
    wait_for(lambda: dead_count(service) == 60, 60, "60 dead letters")
    worker.stop()
    try:
        replay = subprocess.Popen(
            [str(BIN / "celery"), "-A", "workers", "deadletters", "replay", service,
             "--rate", "40"],
            cwd=ROOT, env=base_env(), text=True, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert replay.stdout.readline().startswith("replayed ")
        purged = deadletters("purge", service, "--older-than", "0")
        assert purged.returncode == 0, purged.stderr
        replay.communicate(timeout=60)
        moved = correlation_ids(f"{service}_requests")
        assert len(moved) == len(set(moved)) >= 1
        assert set(moved) <= set(ids)
        assert dead_count(service) == 0
    finally:
        delete_queues(f"{service}_requests", f"{service}_requests.dead")

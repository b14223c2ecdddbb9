"""``celery -A workers deadletters list|replay|purge``, run as operators run it, against
dead letters a real worker made (requests published with a delivery count past
``PROXYMQ_MAX_DELIVERIES``, which the worker dead-letters)."""

import signal
import subprocess
import time
import uuid

import kombu
import pytest
import requests
from poison_requests import publish_poison
from support import (
    BIN,
    BROKER_URL,
    ROOT,
    Scrape,
    base_env,
    delete_queues,
    free_port,
    poll_until_done,
    unique_service,
    wait_for,
)

from proxymq.envelope import SENT_HEADER

RESULT_URL = "redis://127.0.0.1:6379/0"


def deadletters(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "celery"), "-A", "workers", "deadletters", *args],
        cwd=ROOT,
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ready(queue: str) -> int:
    """Ready messages, as the queue's leader counts them now (``rabbitmqctl``'s figures
    for a quorum queue lag by seconds)."""
    with kombu.Connection(BROKER_URL) as connection:
        return connection.default_channel.queue_declare(queue, passive=True).message_count


def dead_count(service: str) -> int:
    return ready(f"{service}_requests.dead")


def ready_headers(queue: str) -> list[dict]:
    """Every ready message's headers, looked at and given back."""
    with kombu.Connection(BROKER_URL) as connection:
        channel = connection.channel()
        bound = kombu.Queue(queue, no_declare=True)(channel)
        found = []
        while (message := bound.get(no_ack=False)) is not None:
            found.append(message.headers)
        channel.close()
    return found


def correlation_ids(queue: str) -> list[str]:
    """Every ready message's correlation id, looked at and given back."""
    with kombu.Connection(BROKER_URL) as connection:
        channel = connection.channel()
        bound = kombu.Queue(queue, no_declare=True)(channel)
        ids = []
        while (message := bound.get(no_ack=False)) is not None:
            ids.append(message.properties.get("correlation_id"))
        channel.close()
    return ids


@pytest.fixture(params=["classic", "quorum"])
def queue_type(request):
    return request.param


@pytest.fixture
def dead_service(stack, downstream, queue_type):
    """A service with 3 dead letters; its worker stopped (the queues stay)."""
    service = unique_service("dead")
    worker = stack.worker(service, downstream.url, PROXYMQ_QUEUE_TYPE=queue_type)
    ids = publish_poison(service, 3)
    wait_for(lambda: dead_count(service) == 3, 30, "three dead letters")
    worker.stop()
    yield service, ids
    delete_queues(f"{service}_requests", f"{service}_requests.dead")


def test_list_shows_each_dead_letter_without_its_body_unless_asked(dead_service):
    service, ids = dead_service
    listed = deadletters("list", service)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == "correlation_id\treason\tdeliveries\tage_s"
    rows = [line.split("\t") for line in lines[1:]]
    assert sorted(row[0] for row in rows) == sorted(ids)
    for _, reason, deliveries, age in rows:
        assert reason == "3 deliveries, PROXYMQ_MAX_DELIVERIES is 3"
        assert deliveries == "4"
        assert 0 <= int(age) < 120
    assert "body-" not in listed.stdout
    assert dead_count(service) == 3  # looked at, not taken
    with_bodies = deadletters("list", service, "--bodies")
    assert "POST /x/0 b'body-0'" in with_bodies.stdout
    assert dead_count(service) == 3


def test_replay_reaches_the_downstream_as_a_fresh_first_delivery_marked_replayed(
    stack, downstream, dead_service, queue_type
):
    service, ids = dead_service
    port = free_port()
    env = {"PROXYMQ_QUEUE_TYPE": queue_type, "PROXYMQ_WORKER_METRICS_PORT": str(port)}
    stack.worker(service, downstream.url, **env)
    replayed = deadletters("replay", service)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 3 dead letters" in replayed.stdout
    for correlation_id in ids:
        wait_for(lambda c=correlation_id: downstream.requests_for(c), 20, "the replayed request")
        (seen,) = downstream.requests_for(correlation_id)
        headers = dict(seen.headers)
        assert headers["X-Proxymq-Replayed"] == "1"
        assert headers["X-Proxymq-Delivery-Count"] == "1"
    assert dead_count(service) == 0
    counted = Scrape(f"http://127.0.0.1:{port}/metrics")
    assert counted.value("proxymq_worker_replayed_total", service=service) == 3


def test_replay_rate_paces_the_copies(dead_service):
    """Three dead letters at 2 a second: the copies are published 0.5 s apart."""
    service, _ = dead_service
    replayed = deadletters("replay", service, "--rate", "2")
    assert replayed.returncode == 0, replayed.stderr
    sent = sorted(headers[SENT_HEADER] for headers in ready_headers(f"{service}_requests"))
    assert len(sent) == 3
    assert sent[-1] - sent[0] >= 900, f"published {sent[-1] - sent[0]} ms apart in all"


def test_replay_limit_takes_only_that_many(dead_service):
    service, ids = dead_service
    replayed = deadletters("replay", service, "--limit", "2")
    assert replayed.returncode == 0, replayed.stderr
    assert dead_count(service) == 1
    moved = correlation_ids(f"{service}_requests")
    assert len(moved) == 2 and set(moved) < set(ids)


def test_purge_older_than_keeps_the_young_then_purge_takes_all(dead_service):
    """No worker is up: the purge stands, and one line says that nobody counted it."""
    service, _ = dead_service
    kept = deadletters("purge", service, "--older-than", "3600")
    assert (kept.returncode, kept.stdout.strip()) == (0, f"purged 0 dead letters of {service}")
    assert "not counted" not in kept.stderr  # nothing to count: no worker asked
    assert dead_count(service) == 3
    time.sleep(1.1)
    aged = deadletters("purge", service, "--older-than", "1")
    assert aged.returncode == 0, aged.stderr
    assert aged.stdout.strip() == f"purged 3 dead letters of {service}"
    assert not_counted_lines(aged) == [
        "not counted in proxymq_worker_dead_letters_purged_total: "
        f"no worker consuming {service}_requests answered"
    ]
    assert dead_count(service) == 0


def not_counted_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("not counted")]


def test_a_purge_is_counted_by_one_worker_of_the_service(
    stack, downstream, dead_service, queue_type
):
    """Two workers serve the service; the purge is counted once, by one of them, so the
    sum over the workers' counters is what was purged."""
    service, _ = dead_service
    ports = [free_port(), free_port()]
    workers = [
        stack.worker(
            service,
            downstream.url,
            PROXYMQ_QUEUE_TYPE=queue_type,
            PROXYMQ_WORKER_METRICS_PORT=str(port),
        )
        for port in ports
    ]
    try:
        purged = deadletters("purge", service)
        assert purged.returncode == 0, purged.stderr
        assert purged.stdout.strip() == f"purged 3 dead letters of {service}"
        assert not_counted_lines(purged) == []

        def counted() -> list[float]:
            urls = [f"http://127.0.0.1:{port}/metrics" for port in ports]
            name = "proxymq_worker_dead_letters_purged_total"
            return sorted(Scrape(url).value(name, service=service) for url in urls)

        wait_for(lambda: counted() == [0, 3], 10, "one worker to count the three purged")
    finally:
        for worker in workers:
            stack.stop_process(worker)


def test_replay_into_a_full_queue_keeps_what_could_not_be_republished(stack, downstream):
    service = unique_service("deadfull")
    worker = stack.worker(service, downstream.url, PROXYMQ_QUEUE_MAX_LENGTH="2")
    ids = publish_poison(service, 5)
    wait_for(lambda: dead_count(service) == 5, 30, "five dead letters")
    worker.stop()
    try:
        replayed = deadletters("replay", service)
        assert replayed.returncode == 1
        assert "refused a copy" in replayed.stderr
        assert ready(f"{service}_requests") == 2
        assert sorted(
            correlation_ids(f"{service}_requests") + correlation_ids(f"{service}_requests.dead")
        ) == sorted(ids)
    finally:
        delete_queues(f"{service}_requests", f"{service}_requests.dead")


def test_a_replay_killed_halfway_loses_nothing_and_copies_each_at_most_once(stack, downstream):
    service = unique_service("deadkill")
    worker = stack.worker(service, downstream.url)
    ids = publish_poison(service, 200)
    wait_for(lambda: dead_count(service) == 200, 60, "200 dead letters")
    worker.stop()
    try:
        command = subprocess.Popen(
            [str(BIN / "celery"), "-A", "workers", "deadletters", "replay", service,
             "--rate", "50"],
            cwd=ROOT,
            env=base_env(),
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        done = 0
        while done < 30:
            line = command.stdout.readline()
            assert line, "the replay ended early"
            done += line.startswith("replayed ")
        command.send_signal(signal.SIGKILL)
        command.wait(10)
        moved = correlation_ids(f"{service}_requests")
        kept = correlation_ids(f"{service}_requests.dead")
        assert len(moved) == len(set(moved)) >= 30
        assert len(moved) < 200
        assert set(moved) | set(kept) == set(ids)
    finally:
        delete_queues(f"{service}_requests", f"{service}_requests.dead")


def test_replay_as_jobs_prints_job_ids_whose_answers_the_gateway_gives(stack, downstream):
    service = unique_service("deadjob")
    worker = stack.worker(service, downstream.url, PROXYMQ_RESULT_URL=RESULT_URL)
    ids = publish_poison(service, 2, path="/job")
    wait_for(lambda: dead_count(service) == 2, 30, "two dead letters")
    try:
        refused = deadletters("replay", service, "--as-jobs")
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1].startswith("Error: PROXYMQ_RESULT_URL")
        assert dead_count(service) == 2
        replayed = deadletters("replay", service, "--as-jobs", PROXYMQ_RESULT_URL=RESULT_URL)
        assert replayed.returncode == 0, replayed.stderr
        jobs = [line.split() for line in replayed.stdout.splitlines() if line.startswith("job ")]
        assert sorted(job[3] for job in jobs) == sorted(ids)
        gateway = stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)
        bodies = set()
        for _, job_id, _, original, _, new in jobs:
            answer = poll_until_done(gateway, f"/jobs/{job_id}")
            assert answer.status_code == 200
            assert answer.headers["X-Correlation-ID"] == new != original
            bodies.add(answer.content)
        assert bodies == {b"body-0", b"body-1"}
        # The job id is the only key: a reader sending a credential is not its owner.
        job_id = jobs[0][1]
        other = requests.get(f"{gateway.url}/jobs/{job_id}", headers={"Authorization": "x"})
        assert other.status_code == 404
    finally:
        worker.stop()
        delete_queues(f"{service}_requests", f"{service}_requests.dead")


def test_replay_works_through_a_failover_list_whose_first_node_is_down(dead_service):
    service, ids = dead_service
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    replayed = deadletters("replay", service, PROXYMQ_BROKER_URL=f"{down};{BROKER_URL}")
    assert replayed.returncode == 0, replayed.stderr
    assert sorted(correlation_ids(f"{service}_requests")) == sorted(ids)


def test_an_unknown_service_is_one_line_and_exit_1():
    result = deadletters("list", unique_service("nosuch"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("Error: no queue ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_operator_permissions_docs_name_are_enough(dead_service):
    """docs/failures.md: read on the dead queues, write on the default exchange."""
    service, ids = dead_service
    name, password = f"operator-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_user", name, password], check=True, capture_output=True)
    try:
        permissions = ["^$", r"^amq\.default$", r"^.*_requests\.dead$"]
        subprocess.run(
            [*ctl, "set_permissions", "-p", "/", name, *permissions],
            check=True,
            capture_output=True,
        )
        url = BROKER_URL.replace("guest:guest", f"{name}:{password}")
        assert deadletters("list", service, PROXYMQ_BROKER_URL=url).returncode == 0
        replayed = deadletters("replay", service, PROXYMQ_BROKER_URL=url)
        assert replayed.returncode == 0, replayed.stderr
        assert sorted(correlation_ids(f"{service}_requests")) == sorted(ids)
        # Purging needs nothing more; counting it (Celery's remote control) does.
        with kombu.Connection(BROKER_URL) as connection:
            connection.Producer().publish(b"x", routing_key=f"{service}_requests.dead")
        purged = deadletters("purge", service, PROXYMQ_BROKER_URL=url)
        assert purged.returncode == 0, purged.stderr
        assert purged.stdout.strip() == f"purged 1 dead letters of {service}"
        (refused,) = not_counted_lines(purged)
        assert "cannot ask the workers: AccessRefused" in refused
    finally:
        subprocess.run([*ctl, "delete_user", name], capture_output=True)


def test_list_escapes_what_a_forged_dead_letter_says(dead_service):
    """Anyone who may publish through the default exchange can put a message in the dead
    queue: its reason and correlation id must not forge lines on the operator's terminal."""
    service, _ = dead_service
    with kombu.Connection(BROKER_URL) as connection:
        connection.Producer().publish(
            b"x",
            routing_key=f"{service}_requests.dead",
            headers={"x-proxymq-dead-reason": "bad\nforged-id\tforged\t1\t0\x1b[31m"},
            correlation_id="evil\r\nforged",
        )
    listed = deadletters("list", service, "--bodies")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert not any(line.startswith("forged") for line in lines)
    assert "\x1b" not in listed.stdout and "\r" not in listed.stdout
    assert len([line for line in lines if not line.startswith("\t")]) == 1 + 4


def test_a_client_cannot_claim_its_request_was_replayed(stack, downstream):
    service = unique_service("claim")
    stack.worker(service, downstream.url)
    gateway = stack.gateway()
    answer = requests.post(
        f"{gateway.url}/{service}/x", data=b"x", headers={"X-ProxyMQ-Replayed": "7"}, timeout=30
    )
    assert answer.status_code == 200
    (seen,) = downstream.requests_for(answer.headers["X-Correlation-ID"])
    assert "X-Proxymq-Replayed" not in dict(seen.headers)

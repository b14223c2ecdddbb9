"""Every metric ProxyMQ exports, seen after the action that produces it, and every
dashboard and alert expression checked against what the processes really export.

One gateway and one worker (four services from a ``PROXYMQ_CONFIG`` file) run for real,
with Redis for jobs, the words example for a stream and the example fetcher as a batch
service. The test acts, scrapes both ``/metrics`` endpoints and asserts each series. The
names scraped are then the list the Grafana dashboard and the Prometheus rules are held
to: a panel or alert on a metric nobody exports fails here, not on a blank dashboard.
"""

from __future__ import annotations

import json
import time
import uuid

import kombu
import pytest
import requests
import yaml
from deploy.promql import metric_names, substitute_grafana_variables
from poison_requests import publish_poison
from support import (
    BROKER_URL,
    ROOT,
    Scrape,
    consumers,
    delete_queues,
    free_port,
    poll_until_done,
    unique_service,
    wait_for,
)
from test_dead_letters import correlation_ids, deadletters

from proxymq.envelope import RequestEnvelope, task_message

RESULT_URL = "redis://127.0.0.1:6379/0"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"


@pytest.fixture(scope="module")
def services():
    names = {role: unique_service(role) for role in ("plain", "words", "batch", "shed")}
    yield names
    delete_queues(*(f"{n}_requests" for n in names.values()), f"{names['plain']}_requests.dead")
    delete_queues(*(f"{n}_callbacks{tail}" for n in names.values() for tail in ("", ".retry.5000")))


@pytest.fixture(scope="module")
def running(stack, downstream, services):
    """The gateway's and the worker's metrics URLs, with everything started."""
    words_port = free_port()
    words = f"http://127.0.0.1:{words_port}"
    args = ["gunicorn", "examples.words:app", "-b", f"127.0.0.1:{words_port}"]
    process = stack.run("words", args)
    stack.await_ready(process, lambda: requests.get(words + "/healthz", timeout=1).ok, "words")
    fetcher = stack.fetcher()
    config = stack.dir / "metrics-services.toml"
    config.write_text(
        f'[services.{services["plain"]}]\ndownstream_url = "{downstream.url}"\n'
        "max_concurrency = 64\nretries = 1\nretry_budget = 1\n"  # the flow control's series
        f'[services.{services["words"]}]\ndownstream_url = "{words}"\n'
        f'[services.{services["batch"]}]\ndownstream_url = "{fetcher}"\n'
        f'batch_url = "{fetcher}/batch"\nbatch_size = 4\nbatch_wait_ms = 2000\n'
    )
    worker_port = free_port()
    queues = ",".join(f"{services[r]}_requests" for r in ("plain", "words", "batch"))
    node = f"metrics-{uuid.uuid4().hex[:6]}@%h"
    args = ["celery", "-A", "workers", "worker", "-Q", queues, "-n", node]
    worker = stack.run(
        "worker",
        [*args, "--without-mingle", "--without-gossip"],
        PROXYMQ_CONFIG=str(config),
        PROXYMQ_RESULT_URL=RESULT_URL,
        PROXYMQ_WORKER_METRICS_PORT=str(worker_port),
        PROXYMQ_CALLBACK_ALLOW_PRIVATE="true",
        PROXYMQ_CALLBACK_RETRIES="0",
    )
    for role in ("plain", "words", "batch"):
        stack.await_ready(worker, lambda r=role: consumers(f"{services[r]}_requests") == 1, role)
    gateway = stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)
    return gateway, f"{gateway.url}/metrics", f"http://127.0.0.1:{worker_port}/metrics"


def post(gateway, service: str, path: str, body: bytes = b"x", **headers: str):
    return requests.post(f"{gateway.url}/{service}{path}", data=body, headers=headers, timeout=30)


def publish(queue: str, body: bytes, headers: dict, properties: dict) -> None:
    with kombu.Connection(BROKER_URL) as connection:
        kombu.Producer(connection.default_channel).publish(
            body, routing_key=queue, retry=True, **properties, headers=headers
        )


def test_a_synchronous_request_and_a_timeout(running, services):
    gateway, gateway_metrics, worker_metrics = running
    plain = services["plain"]
    assert post(gateway, plain, "/echo").status_code == 200
    late = post(gateway, plain, "/sleep/3", **{"X-ProxyMQ-Timeout": "0.5"})
    assert late.status_code == 504
    scrape = Scrape(gateway_metrics)
    assert scrape.value("proxymq_gateway_requests_total", service=plain, status="200") == 1
    assert scrape.value("proxymq_gateway_timeouts_total", service=plain) == 1
    assert scrape.value("proxymq_gateway_request_duration_seconds_count", service=plain) == 2
    assert scrape.value("proxymq_gateway_inflight", service=plain) == 0
    wait_for(
        lambda: (
            Scrape(worker_metrics).value(
                "proxymq_worker_downstream_requests_total", service=plain, status="504"
            )
            == 1
        ),
        15,
        "the worker to give up the slow call at its deadline",
    )
    scrape = Scrape(worker_metrics)
    assert scrape.value("proxymq_worker_downstream_requests_total", service=plain) == 2
    assert scrape.value("proxymq_worker_downstream_duration_seconds_count", service=plain) == 2
    assert scrape.value("proxymq_worker_queue_wait_seconds_count", service=plain) == 2


def test_a_job_is_counted_submitted_at_the_gateway_and_completed_at_the_worker(running, services):
    gateway, gateway_metrics, worker_metrics = running
    plain = services["plain"]
    accepted = post(gateway, plain, "/job", b"later", Prefer="respond-async")
    assert accepted.status_code == 202
    answer = poll_until_done(gateway, accepted.headers["Location"])
    assert (answer.status_code, answer.content) == (200, b"later")
    gateway_jobs = Scrape(gateway_metrics).value
    assert gateway_jobs("proxymq_gateway_jobs_total", service=plain, event="submitted") == 1
    worker_jobs = Scrape(worker_metrics).value
    assert worker_jobs("proxymq_worker_jobs_total", service=plain, outcome="completed") == 1


def test_a_job_callback_failing_for_good_is_counted(running, services, downstream):
    gateway, _, worker_metrics = running
    plain = services["plain"]
    refusing = downstream.url + "/status/500"  # PROXYMQ_CALLBACK_RETRIES=0: one attempt
    headers = {"Prefer": "respond-async", "X-ProxyMQ-Callback": refusing}
    accepted = post(gateway, plain, "/job", b"called", **headers)
    assert poll_until_done(gateway, accepted.headers["Location"]).status_code == 200
    wait_for(
        lambda: (
            Scrape(worker_metrics).value(
                "proxymq_worker_callbacks_total", service=plain, outcome="failed"
            )
            == 1
        ),
        15,
        "the failed callback to be counted",
    )


def test_a_stream_counts_its_bytes_at_the_gateway_and_its_end_at_the_worker(running, services):
    gateway, gateway_metrics, worker_metrics = running
    words = services["words"]
    before = Scrape(gateway_metrics).value("proxymq_gateway_streamed_bytes_total")
    answer = requests.get(
        f"{gateway.url}/{words}/words", params={"text": "one two three", "delay_ms": "0"}
    )
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    streamed = Scrape(gateway_metrics).value("proxymq_gateway_streamed_bytes_total") - before
    # Other tests' gateways write to their own metrics directories: this is ours alone.
    assert streamed == len(answer.content)
    wait_for(
        lambda: (
            Scrape(worker_metrics).value(
                "proxymq_worker_streams_total", service=words, outcome="end"
            )
            == 1
        ),
        10,
        "the worker to count the stream's end",
    )


def test_a_batch_observes_its_size_and_its_wait(running, services, downstream):
    gateway, _, worker_metrics = running
    batch = services["batch"]
    body = json.dumps({"url": downstream.url + "/fetched"}).encode()
    answer = post(gateway, batch, "/fetch", body, **{"Content-Type": "application/json"})
    assert answer.status_code == 200 and answer.json()["status"] == 200
    scrape = Scrape(worker_metrics)
    assert scrape.value("proxymq_worker_batch_size_count", service=batch) == 1
    assert scrape.value("proxymq_worker_batch_size_sum", service=batch) == 1
    assert scrape.value("proxymq_worker_batch_wait_seconds_count", service=batch) == 1
    # A lone request on an idle worker does not wait out the 2 s window (docs/batching.md);
    # half of it is room for a loaded machine.
    assert scrape.value("proxymq_worker_batch_wait_seconds_sum", service=batch) < 1.0


def test_an_undecodable_message_is_counted_dead_lettered(running, services):
    _, _, worker_metrics = running
    plain = services["plain"]
    headers = {"task": "proxymq.forward", "id": "garbage", "lang": "py"}
    properties = {"content_type": "application/x-msgpack", "content_encoding": "binary"}
    publish(f"{plain}_requests", b"\xc1 not msgpack", headers, properties)
    wait_for(
        lambda: (
            Scrape(worker_metrics).value("proxymq_worker_dead_lettered_total", service=plain) == 1
        ),
        10,
        "the dead letter to be counted",
    )


def test_a_replayed_dead_letter_is_counted_as_the_worker_takes_it(running, services, downstream):
    _, _, worker_metrics = running
    plain = services["plain"]
    (correlation_id,) = publish_poison(plain, 1)
    wait_for(
        lambda: correlation_id in correlation_ids(f"{plain}_requests.dead"), 15, "the dead letter"
    )
    replayed = deadletters("replay", plain)
    assert replayed.returncode == 0, replayed.stderr
    wait_for(lambda: downstream.requests_for(correlation_id), 15, "the replayed call")
    scrape = Scrape(worker_metrics)
    assert scrape.value("proxymq_worker_replayed_total", service=plain) == 1


def test_a_purge_is_counted_by_the_worker_of_its_service(running, services):
    """The ``deadletters`` command ends before any scrape: the worker counts its purge."""
    _, _, worker_metrics = running
    plain = services["plain"]
    ids = publish_poison(plain, 2)
    wait_for(
        lambda: set(ids) <= set(correlation_ids(f"{plain}_requests.dead")), 15, "two dead letters"
    )
    purged = deadletters("purge", plain)
    assert purged.returncode == 0, purged.stderr
    count = int(purged.stdout.split()[1])  # "purged N dead letters of <service>"
    assert count >= 2
    wait_for(
        lambda: (
            Scrape(worker_metrics).value("proxymq_worker_dead_letters_purged_total", service=plain)
            == count
        ),
        10,
        "the purge to be counted",
    )


def test_a_request_taken_past_its_deadline_is_counted_expired(running, services, downstream):
    """The broker drops a request whose ``expiration`` ran out in the queue; the worker
    drops one that arrives past its deadline all the same (the deadline is the gateway's
    clock, the expiration counts from the broker's arrival). Such a message, published
    here without an expiration, is dropped unseen and counted."""
    _, _, worker_metrics = running
    plain = services["plain"]
    request = RequestEnvelope(
        plain, "POST", "/expired", None, [], b"", deadline=int(time.time() * 1000) - 1000
    )
    correlation_id = f"expired-{uuid.uuid4().hex}"
    body, headers, properties = task_message(request, correlation_id, None)
    del properties["expiration"]
    publish(f"{plain}_requests", body, headers, properties)
    wait_for(
        lambda: Scrape(worker_metrics).value("proxymq_worker_expired_total", service=plain) == 1,
        10,
        "the expired request to be counted",
    )
    assert downstream.requests_for(correlation_id) == []


def test_a_retry_is_counted_by_reason_and_the_flow_series_are_there(running, services):
    gateway, _, worker_metrics = running
    plain = services["plain"]
    answer = requests.get(f"{gateway.url}/{plain}/status/503", timeout=30)
    assert answer.status_code == 503  # the last attempt's answer
    scrape = Scrape(worker_metrics)
    assert scrape.value("proxymq_worker_retries_total", service=plain, reason="503") == 1
    assert scrape.value("proxymq_worker_concurrency_limit", service=plain) == 64
    assert scrape.value("proxymq_worker_flow_degraded", service=plain) == 0
    assert scrape.value("proxymq_worker_breaker_open", service=plain) == 0


def test_a_full_queue_sheds_and_is_counted(running, services):
    """``shed_total`` counts the gateway's own refusals: queue-full (a confirm nack from a
    queue at its ``x-max-length``) and broker-unavailable. A full queue is the one to make
    on the shared broker: the queue is declared here as a worker with
    ``PROXYMQ_QUEUE_MAX_LENGTH=1`` would, then filled."""
    gateway, gateway_metrics, _ = running
    queue = f"{services['shed']}_requests"
    with kombu.Connection(BROKER_URL) as connection:
        channel = connection.default_channel
        channel.queue_declare(
            queue, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        channel.basic_publish(channel.prepare_message(b"filler"), routing_key=queue)
    shed = post(gateway, services["shed"], "/x")
    assert (shed.status_code, shed.headers["X-ProxyMQ-Error"]) == (503, "queue-full")
    assert Scrape(gateway_metrics).value("proxymq_gateway_shed_total", reason="queue-full") == 1


def queries() -> list[tuple[str, str]]:
    """Every PromQL expression of the dashboards and the alert rules, with where it is."""
    found = []
    for path in DASHBOARDS:
        panels = json.loads(path.read_text())["panels"]
        while panels:
            panel = panels.pop()
            panels += panel.get("panels", [])
            for target in panel.get("targets", []):
                if target.get("expr"):
                    where = f"{path.name}: {panel['title']} / {target['refId']}"
                    found.append((where, substitute_grafana_variables(target["expr"])))
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            found.append((f"{RULES.name}: {rule.get('alert') or rule['record']}", rule["expr"]))
    return found


def test_every_dashboard_and_alert_uses_only_metrics_the_processes_export(running):
    """Runs last in this module: by then every action above has made its series."""
    _, gateway_metrics, worker_metrics = running
    exported = Scrape(gateway_metrics).names | Scrape(worker_metrics).names
    assert len(queries()) >= 20
    used = set()
    for where, expr in queries():
        ours = {name for name in metric_names(expr) if name.startswith("proxymq_")}
        assert ours <= exported, f"{where} uses metrics nobody exports: {ours - exported}"
        used |= ours
    # The checks above looked at something: the dashboard's core series are among them.
    assert {"proxymq_gateway_requests_total", "proxymq_worker_dead_lettered_total"} <= used

"""Processes start with the documented commands, and stop with one line on bad settings."""

import subprocess

import pytest
import requests
from stack import BIN, ROOT, base_env, unique_service


def run(args, **env):
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=ROOT,
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROXYMQ_REPLY_TIMEOUT", "soon"),
        ("PROXYMQ_BROKER_URL", "redis://localhost"),
        ("PROXYMQ_GATEWAY_BIND", "nowhere"),
        ("PROXYMQ_MAX_BODY_BYTES", "-5"),
    ],
)
def test_gateway_with_bad_setting_exits_with_one_line(variable, value):
    result = run(["gunicorn", "gateway:app"], **{variable: value})
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert variable in lines[0]


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PROXYMQ_DOWNSTREAM_URL": "not a url"}, "PROXYMQ_DOWNSTREAM_URL"),
        ({"PROXYMQ_DOWNSTREAM_URL": "http://x", "PROXYMQ_BATCH_SIZE": "-1"}, "PROXYMQ_BATCH_SIZE"),
        (
            {"PROXYMQ_DOWNSTREAM_URL": "http://x", "PROXYMQ_BROKER_URL": "amqp:/"},
            "PROXYMQ_BROKER_URL",
        ),
        ({}, "PROXYMQ_DOWNSTREAM_URL"),
        (
            {"PROXYMQ_DOWNSTREAM_URL": "http://x", "PROXYMQ_CONFIG": "/nonexistent.toml"},
            "PROXYMQ_CONFIG",
        ),
    ],
)
def test_worker_with_bad_setting_exits_with_one_line(env, variable):
    result = run(["celery", "-A", "workers", "worker", "-Q", "svc_requests"], **env)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).strip().splitlines() if line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {variable}: ")


@pytest.mark.parametrize("pool", ["solo", "gevent"])
def test_worker_on_another_pool_than_threads_exits_with_one_line(pool):
    args = ["celery", "-A", "workers", "worker", "-Q", "svc_requests", "-P", pool]
    result = run(args, PROXYMQ_DOWNSTREAM_URL="http://x")
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).strip().splitlines() if line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: -P: ProxyMQ workers run on the threads pool")


def test_healthz_and_readyz_answer_200_when_connected(stack):
    gateway = stack.gateway()
    assert requests.get(gateway.url + "/healthz").status_code == 200
    assert requests.get(gateway.url + "/readyz").status_code == 200


def test_without_a_broker_readyz_is_503_and_requests_fail_fast(stack):
    gateway = stack.gateway(
        ready_path="/healthz", PROXYMQ_BROKER_URL="amqp://guest:guest@127.0.0.1:9//"
    )
    assert requests.get(gateway.url + "/readyz").status_code == 503
    response = requests.get(f"{gateway.url}/{unique_service()}/x", timeout=5)
    assert response.status_code == 503
    assert response.headers["X-ProxyMQ-Error"] == "broker-unavailable"
    assert int(response.headers["Retry-After"]) > 0


def test_task_events_can_be_switched_off_for_peak_throughput(stack, downstream):
    service = unique_service("noevents")
    on = stack.worker(service, downstream.url)
    off = stack.worker(service, downstream.url, PROXYMQ_TASK_EVENTS="false")
    assert "task events: ON" in on.log()
    assert "task events: OFF" in off.log()

"""Processes start with the documented commands, and stop with one line on bad settings."""

import subprocess

import pytest
import requests
from support import BIN, ROOT, base_env, unique_service


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


# A password that urllib cannot parse out of an unencoded URL: its "/", "#", "?" or "@"
# makes urlsplit read part of it as the port or the path, and the error quoted that part.
SECRET = "Wq7zK9xPv2jM"
LEAKY_URLS = [
    ("PROXYMQ_BROKER_URL", "amqp://gateway:Wq7z/K9xPv2jM@rabbit//"),
    ("PROXYMQ_BROKER_URL", "amqp://gateway:Wq7z#K9xPv2jM@rabbit//"),
    ("PROXYMQ_BROKER_URL", "amqp://gateway:Wq7z?K9xPv2jM@rabbit//"),
    ("PROXYMQ_BROKER_URL", "amqp://gateway:Wq7z@K9xPv2jM@rabbit:5672x//"),
    ("PROXYMQ_BROKER_URL", "amqp://gateway:Wq7zK9xPv2jM@rabbit:99999//"),
    ("PROXYMQ_BROKER_URL", "http://gateway:Wq7zK9xPv2jM@rabbit//"),
    ("PROXYMQ_BROKER_URL", "gateway:Wq7zK9xPv2jM@rabbit"),
    ("PROXYMQ_BROKER_URL", "amqp://gateway:Wq7zK9xPv2jM@a//;amqp://gateway:Wq7z/K9xPv2jM@b//"),
    ("PROXYMQ_BROKER_URL", "amqp://gateway:Wq7zK9xPv2jM@a//;amqps://gateway:Wq7zK9xPv2jM@b//"),
    ("PROXYMQ_BROKER_URL", "amqp://gateway:Wq7zK9;xPv2jM@a//"),
    ("PROXYMQ_RESULT_URL", "redis://:Wq7z/K9xPv2jM@redis:6379/0"),
    ("PROXYMQ_RESULT_URL", "redis://redis:63x79/0?password=Wq7zK9xPv2jM"),
]


def _fragments(secret: str, size: int = 4) -> set[str]:
    return {secret[start : start + size] for start in range(len(secret) - size + 1)}


def assert_one_line_without_secret(result, variable: str) -> None:
    assert result.returncode != 0
    output = result.stdout + result.stderr
    lines = [line for line in output.strip().splitlines() if line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {variable}: "), lines
    leaked = sorted(part for part in _fragments(SECRET) if part in output)
    assert not leaked, (leaked, lines)


@pytest.mark.parametrize(("variable", "value"), LEAKY_URLS)
def test_gateway_refusing_a_url_never_prints_its_password(variable, value):
    result = run(["gunicorn", "gateway:app"], **{variable: value})
    assert_one_line_without_secret(result, variable)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        *LEAKY_URLS,
        ("PROXYMQ_DOWNSTREAM_URL", "http://svc:Wq7z/K9xPv2jM@downstream/"),
        ("PROXYMQ_DOWNSTREAM_URL", "ftp://svc:Wq7zK9xPv2jM@downstream/"),
        ("PROXYMQ_HEALTH_URL", "http://downstream:8o/health?token=Wq7zK9xPv2jM"),
        ("PROXYMQ_BATCH_URL", "http://svc:Wq7z?K9xPv2jM@downstream/"),
    ],
)
def test_worker_refusing_a_url_never_prints_its_password(variable, value):
    env = {"PROXYMQ_DOWNSTREAM_URL": "http://x", variable: value}
    result = run(["celery", "-A", "workers", "worker", "-Q", "svc_requests"], **env)
    assert_one_line_without_secret(result, variable)


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

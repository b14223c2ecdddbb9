"""The real command, ``gunicorn fetcher:app``, run from the repository root.

The repository's ``gunicorn.conf.py`` (if present) is picked up as it would be for a
user; the sync variant checks the app also works with plain threads instead of gevent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).with_name("gunicorn")
START_DEADLINE = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _fetcher_environ(**settings: str) -> dict[str, str]:
    """This environment without the caller's FETCHER_* settings, plus ``settings``."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("FETCHER_")}
    environ.update(settings)
    return environ


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _wait_until_up(process: subprocess.Popen, base: str, log: Path) -> None:
    """Poll /healthz until it answers, the process dies, or the deadline passes."""
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"gunicorn exited with {process.returncode}:\n{log.read_text()}")
        if _answers(f"{base}/healthz"):
            return
        time.sleep(0.1)
    pytest.fail(f"gunicorn did not answer within {START_DEADLINE} s:\n{log.read_text()}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.fixture(params=[[], ["--worker-class", "sync", "--threads", "1"]], ids=["default", "sync"])
def gunicorn_fetcher(request, tmp_path: Path) -> Iterator[str]:
    """Start ``gunicorn fetcher:app`` on a free loopback port; yield its base URL."""
    port = _free_port()
    log = tmp_path / "gunicorn.log"
    environ = _fetcher_environ(FETCHER_ALLOW_PRIVATE="true", FETCHER_TIMEOUT="5")
    command = [str(GUNICORN), "fetcher:app", "-b", f"127.0.0.1:{port}", *request.param]
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=environ, stdout=output, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(process, base, log)
        yield base
    finally:
        _stop(process)


def test_gunicorn_serves_fetch(gunicorn_fetcher: str, local_server) -> None:
    url = local_server.url("/ok")
    response = requests.post(f"{gunicorn_fetcher}/fetch", json={"url": url}, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert (body["url"], body["final_url"], body["status"]) == (url, url, 200)
    assert (body["content_type"], body["size"]) == ("text/plain", 11)
    assert "error" not in body


def test_gunicorn_serves_concurrent_batches(gunicorn_fetcher: str, local_server) -> None:
    body = json.dumps({"url": local_server.url("/sleep?s=0.5")})
    items = [
        {"correlation_id": str(n), "method": "POST", "path": "/fetch", "body": body}
        for n in range(5)
    ]
    started = time.monotonic()
    response = requests.post(f"{gunicorn_fetcher}/batch", json=items, timeout=10)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert [json.loads(item["body"])["status"] for item in response.json()] == [200] * 5
    assert elapsed < 2.5  # five 0.5 s fetches one after another would take 2.5 s


def test_gunicorn_binds_fetcher_bind_without_b(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "gunicorn.log"
    environ = _fetcher_environ(FETCHER_BIND=f"127.0.0.1:{port}")
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(GUNICORN), "fetcher:app"], cwd=REPO, env=environ, stdout=output, stderr=output
        )
    try:
        _wait_until_up(process, f"http://127.0.0.1:{port}", log)
    finally:
        _stop(process)


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        ("FETCHER_BATCH_SIZE", " ", "is set but blank; unset it to mean the default (got ' ')"),
        ("FETCHER_ALLOW_PRIVATE", "True", "must be 'true' or 'false', lower case (got 'True')"),
        ("FETCHER_BIND", "8080", "must be HOST:PORT (got '8080')"),
    ],
)
def test_a_bad_setting_stops_gunicorn_with_one_line(variable: str, value: str, line: str) -> None:
    result = subprocess.run(
        [str(GUNICORN), "fetcher:app"],
        cwd=REPO,
        env=_fetcher_environ(**{variable: value}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == f"Error: {variable}: {line}\n"

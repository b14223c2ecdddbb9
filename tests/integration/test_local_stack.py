"""``scripts/stack`` without Docker (issue 22, "Done when"): it starts the gateway (with
jobs), the url_fetcher worker and the fetcher, the words example and its worker, and
Flower, then shows a synchronous answer, a job going 202 -> 200 and a stream; Flower
answers on its port; ``scripts/stack stop`` ends everything it started and leaves the
RabbitMQ and Redis it found running alone.

The real script runs, as a user runs it, beside the other tests: on free ports of its own
(``STACK_PORTS``), with its logs and pids in a temporary directory (``STACK_RUN``), the
local processes even where a Docker engine runs (``STACK_LOCAL=1``), and without
``scripts/setup`` (``STACK_SETUP=0``: reinstalling the venv the other tests are running
from is not what is tested here). It uses the shared RabbitMQ and Redis, as it does for a
user who runs ``scripts/test``, and the queues ``url_fetcher_requests`` and
``words_requests``, which no other test uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
import requests
from support import BROKER_URL, ROOT, base_env, free_port, wait_for

# What the script starts, by the names of its pid files.
STARTED = {"fetcher", "worker", "words", "words-worker", "gateway", "flower"}

pytestmark = pytest.mark.skipif(
    urlparse(BROKER_URL).hostname not in ("127.0.0.1", "localhost")
    or not all(shutil.which(tool) for tool in ("rabbitmqctl", "redis-cli", "curl")),
    reason="scripts/stack runs against this machine's RabbitMQ and Redis, with their tools",
)


class LocalStack:
    def __init__(self, run: Path) -> None:
        self.run = run
        self.gateway_port, *_, self.flower_port = self.ports = [free_port() for _ in range(6)]
        self.env = base_env(
            STACK_RUN=str(run),
            STACK_PORTS=" ".join(map(str, self.ports)),
            STACK_LOCAL="1",
            STACK_SETUP="0",
        )
        self.env.pop("PROXYMQ_BROKER_URL")  # the script's processes use the local broker
        self.gateway = f"http://127.0.0.1:{self.gateway_port}"
        self.flower = f"http://127.0.0.1:{self.flower_port}"
        self.session: int | None = None
        self.shown: subprocess.CompletedProcess | None = None

    def start(self) -> subprocess.CompletedProcess:
        # A session of its own: every process it starts (nohup keeps them in it) can be
        # found, and killed if stop leaves any.
        script = subprocess.Popen(
            [str(ROOT / "scripts" / "stack")],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.session = script.pid
        # About 20 s on an idle machine; its own waits allow for far more.
        stdout, stderr = script.communicate(timeout=150)
        self.shown = subprocess.CompletedProcess(script.args, script.returncode, stdout, stderr)
        return self.shown

    def stop(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(ROOT / "scripts" / "stack"), "stop"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=90,  # at most 10 s a process; about 20 s in all
            check=False,
        )

    def left(self) -> list[psutil.Process]:
        """The processes of its session still running (zombies are gone already)."""
        alive = []
        for process in psutil.process_iter(["status"]):
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if (
                    os.getsid(process.pid) == self.session
                    and process.info["status"] != psutil.STATUS_ZOMBIE
                ):
                    alive.append(process)
        return alive

    def logs(self) -> str:
        return "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in self.run.glob("*.log"))


def answers(stdout: str) -> list[tuple[int, dict[str, str], str]]:
    """The HTTP answers ``curl -i`` printed: status, headers, and what follows them."""
    found = []
    for answer in re.split(r"^(?=HTTP/1\.1 )", stdout.replace("\r\n", "\n"), flags=re.M)[1:]:
        head, _, rest = answer.partition("\n\n")
        status_line, *lines = head.splitlines()
        headers = dict(line.split(": ", 1) for line in lines)
        found.append((int(status_line.split()[1]), headers, rest))
    return found


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    stack = LocalStack(tmp_path_factory.mktemp("stack") / "run")
    try:
        done = stack.start()
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{stack.logs()}"
        yield stack
    finally:
        # Never the shared broker or Redis: the script found them running, so it must
        # not have marked them as its own (test_stop_... says so); the marks go first.
        for mark in ("rabbitmq.started", "redis.started"):
            (stack.run / mark).unlink(missing_ok=True)
        if stack.session is not None and stack.left():
            stack.stop()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(stack.session, signal.SIGKILL)


def test_it_shows_a_synchronous_answer_a_job_going_202_then_200_and_a_stream(local):
    out = local.shown.stdout
    why = f"{out}\n{local.shown.stderr}\n{local.logs()}"
    (sync_status, _, sync_body), (accepted, job, _), *polls = answers(out)

    assert sync_status == 200, why
    fetched = json.loads(sync_body.splitlines()[0])
    assert (fetched["url"], fetched["status"]) == (f"{local.gateway}/healthz", 200), why

    assert accepted == 202, why
    assert job["Location"].startswith("/jobs/"), why
    # Polled while 202 (at most once shown), then the answer the synchronous call gives.
    *running, (done_status, done_headers, rest) = polls
    assert [status for status, _, _ in running] in ([], [202]), why
    assert done_status == 200, why
    assert done_headers["X-Correlation-ID"] == job["X-Correlation-ID"], why
    page, _, stream = rest.partition("\n")
    slow = json.loads(page)
    assert slow["status"] == 200, why
    assert slow["content_type"].startswith("text/event-stream"), why

    # and the stream, word by word, as the words example sends it
    events = [event for event in stream.strip().split("\n\n") if event]
    assert events == [
        "data: streamed",
        "data: through",
        "data: the",
        "data: queue",
        "event: end\ndata: 4",
    ], why


def test_flower_is_up_on_its_port_behind_its_password(local):
    assert f"Flower: OK on {local.flower}" in local.shown.stdout
    assert requests.get(f"{local.flower}/healthcheck", timeout=10).status_code == 200
    password = (local.run / "flower.password").read_text()
    assert requests.get(f"{local.flower}/workers", timeout=30).status_code == 401
    page = requests.get(f"{local.flower}/workers", auth=("flower", password), timeout=30)
    assert page.status_code == 200


def test_stop_ends_everything_it_started_and_leaves_the_broker_and_redis(local):
    assert {pid.stem for pid in local.run.glob("*.pid")} == STARTED
    started = [psutil.Process(int(pid.read_text())) for pid in local.run.glob("*.pid")]
    assert all(process.is_running() for process in started)
    assert not list(local.run.glob("*.started")), "it took the running broker or Redis for its own"

    begun = time.monotonic()
    stopped = local.stop()
    assert stopped.returncode == 0, stopped.stderr
    # The processes it started exit with their children; a moment for the last to go.
    wait_for(lambda: not local.left(), 10, "the stack's processes to exit")
    assert not list(local.run.glob("*.pid"))
    print(f"scripts/stack stop took {time.monotonic() - begun:.1f} s")

    redis = subprocess.run(["redis-cli", "-h", "127.0.0.1", "ping"], capture_output=True, text=True)
    assert redis.stdout.strip() == "PONG"
    assert subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True).returncode == 0

"""Running the real processes (gateway, workers, the example downstream) for tests and for
the benchmark (bench/).

Processes are started with the commands users run (``gunicorn gateway:app``,
``celery -A workers worker -Q ...``) from the repository root, each in a session of its
own (stopping it reaches everything it forked: gunicorn's workers, Celery's children),
with its output in a log file whose end is shown when it fails to start. Readiness is
awaited as a condition (an HTTP answer, a consumer on a queue), never as a fixed sleep,
and a process that dies while we wait fails the wait at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from support.broker import BROKER_URL, consumers
from support.names import free_port
from support.waiting import NOT_YET, wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def base_env(**extra: str) -> dict[str, str]:
    """The caller's environment without its PROXYMQ_* and FETCHER_* settings (a
    developer's shell must not change what is tested or measured), the venv first on
    PATH, the test broker; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXYMQ_", "FETCHER_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PROXYMQ_BROKER_URL"] = BROKER_URL
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Process:
    """One started command; ``stop()`` terminates it and everything it spawned."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen = field(init=False)

    def start(self) -> Process:
        with open(self.log_path, "wb") as log:  # the child keeps its own copy
            self.popen = subprocess.Popen(
                self.args,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def name(self) -> str:
        """The name it was started under (its log file's, without the counter)."""
        return self.log_path.stem.rsplit("-", 1)[0]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        # PermissionError: the group's leader is gone and its ID was reused by someone else.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.signal(signal.SIGKILL)  # stragglers of the process group


class StartError(AssertionError):
    """A process did not become ready; the message carries the end of its log. An
    AssertionError, so that a test that cannot start its stack fails rather than errs."""


def await_ready(
    condition: Callable[[], bool],
    watched: list[Process],
    what: str,
    timeout: float = 30,
) -> None:
    """``wait_for(condition)``, failing at once, with the end of its log, when one of the
    ``watched`` processes exits."""

    def ready() -> bool:
        if dead := [process for process in watched if not process.alive()]:
            raise StartError(f"{what} did not start: {dead[0].name} exited\n{dead[0].log_tail()}")
        return condition()

    try:
        wait_for(ready, timeout, what, ignoring=NOT_YET)
    except TimeoutError as exc:
        tails = "\n".join(f"--- {process.log_path}\n{process.log_tail()}" for process in watched)
        raise StartError(f"{what} did not start ({exc}):\n{tails}") from None


@dataclass
class Gateway:
    process: Process
    url: str


class Stack:
    """Starts processes (for one test module, or one benchmark run) and stops them all at
    the end, newest first. Logs go to ``directory`` (a new temporary one by default)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.processes: list[Process] = []
        self.dir = directory or Path(tempfile.mkdtemp(prefix="proxymq-test-"))

    def run(self, name: str, args: list[str], **env: str) -> Process:
        """``args`` with its command looked up in the venv's bin (an absolute path stays
        as it is), in ``base_env(**env)``."""
        log_path = self.dir / f"{name}-{len(self.processes)}.log"
        process = Process([str(BIN / args[0]), *args[1:]], base_env(**env), log_path).start()
        self.processes.append(process)
        return process

    def gateway(
        self, *extra: str, workers: int = 1, ready_path: str = "/readyz", **env: str
    ) -> Gateway:
        """``gunicorn gateway:app -w <workers>``, with ``extra`` gunicorn arguments."""
        port = free_port()
        env.setdefault("PROXYMQ_GATEWAY_BIND", f"127.0.0.1:{port}")
        args = ["gunicorn", "gateway:app", "-w", str(workers), *extra]
        process = self.run("gateway", args, **env)
        gateway = Gateway(process, f"http://127.0.0.1:{port}")
        self.await_ready(
            process, lambda: requests.get(gateway.url + ready_path, timeout=1).ok, "gateway"
        )
        return gateway

    def worker(
        self,
        service: str,
        downstream_url: str,
        *extra: str,
        wait: bool = True,
        named: bool = True,
        **env: str,
    ) -> Process:
        """``celery -A workers worker -Q <service>_requests``, with a node name of its own
        unless ``named`` is False (then the worker picks its default)."""
        env.setdefault("PROXYMQ_DOWNSTREAM_URL", downstream_url)
        env.setdefault("PROXYMQ_WORKER_METRICS_PORT", str(free_port()))
        args = ["celery", "-A", "workers", "worker", "-Q", f"{service}_requests"]
        if named:
            args += ["-n", f"w{len(self.processes)}-{uuid.uuid4().hex[:6]}@%h"]
        # Counted before it starts, and from 0: the queue exists (declared by the worker)
        # a little before its consumer does.
        before = max(0, consumers(f"{service}_requests"))
        process = self.run("worker", [*args, "--without-mingle", "--without-gossip", *extra], **env)
        if not wait:
            return process
        self.await_ready(
            process, lambda: consumers(f"{service}_requests") > before, f"worker for {service}"
        )
        return process

    def fetcher(self, **env: str) -> str:
        """The example downstream (``gunicorn fetcher:app``), allowed to fetch this
        machine's test servers; its base URL once it answers /healthz."""
        port = free_port()
        self.run(
            "fetcher",
            ["gunicorn", "fetcher:app"],
            FETCHER_ALLOW_PRIVATE="true",
            FETCHER_BIND=f"127.0.0.1:{port}",
            **env,
        )
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(url + "/healthz", timeout=1).ok, 30, "fetcher")
        return url

    def await_ready(self, process: Process, condition: Callable[[], bool], what: str) -> None:
        """``condition`` within 30 s, while ``process`` lives; else ``StartError``."""
        await_ready(condition, [process], what)

    def stop_process(self, process: Process) -> None:
        """Stop one process before the others (and forget it)."""
        process.stop()
        if process in self.processes:
            self.processes.remove(process)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@contextlib.contextmanager
def running_stack() -> Iterator[Stack]:
    stack = Stack()
    try:
        yield stack
    finally:
        stack.stop()


def poll_until_done(gateway: Gateway, location: str, timeout: float = 30, **headers: str):
    """GET a job's ``Location`` until it is no longer 202; the last answer."""
    answers = []

    def done() -> bool:
        answers.append(requests.get(gateway.url + location, headers=headers))
        return answers[-1].status_code != 202

    wait_for(done, timeout, f"job {location}", interval=0.1)
    return answers[-1]

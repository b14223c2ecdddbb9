"""Starting, watching and stopping the benchmark's processes.

Each process runs in its own session (process group), so stopping it reaches everything
it forked (gunicorn's workers, Celery's children), and its output goes to its own log
file. Readiness is always a condition polled until it holds, never a fixed sleep, and a
process that dies while we wait fails at once with the end of its log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(broker_url: str, **extra: str) -> dict[str, str]:
    """The caller's environment without its PROXYMQ_* settings, so a developer's shell
    cannot change what is measured; the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYMQ_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PROXYMQ_BROKER_URL"] = broker_url
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Proc:
    """One started command and its log."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the group, then SIGKILL whatever is left of it."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(5)
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)


@dataclass
class Procs:
    """Every process of a run; ``stop_all`` (in a ``finally``) stops them newest first."""

    log_dir: Path
    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        log_path = self.log_dir / f"{name}-{len(self.started)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        while self.started:
            self.stop(self.started[-1])


class StartError(RuntimeError):
    """A process did not become ready; the message carries the end of its log."""


def wait_until(
    condition: Callable[[], bool], watched: list[Proc], what: str, timeout: float = 60
) -> None:
    """Poll ``condition`` (exceptions count as not yet) until it holds; fail at once when
    a ``watched`` process dies, with the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in watched:
            if not proc.alive():
                raise StartError(f"{what}: {proc.name} exited\n{proc.log_tail()}")
        with contextlib.suppress(Exception):
            if condition():
                return
        time.sleep(0.05)
    tails = "\n".join(f"--- {proc.log_path}\n{proc.log_tail()}" for proc in watched)
    raise StartError(f"{what}: not ready after {timeout}s\n{tails}")


# -- resource accounting ------------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants."""
    total = 0.0
    for process in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for process in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total

"""Running the real processes for integration tests: gateway, workers, a downstream.

Processes are started with the commands users run (``gunicorn gateway:app``,
``celery -A workers worker -Q ...``) from the repository root, with their output in a
log file that is printed when a test fails to start one. Readiness is awaited as a
condition (an HTTP answer, a consumer on a queue), never as a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import kombu
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BROKER_URL = os.environ.get("PROXYMQ_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval=0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if condition():
                return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def unique_service(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# -- processes ---------------------------------------------------------------------------


@dataclass
class Process:
    """One started command; ``stop()`` terminates it and everything it spawned."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen = field(init=False)

    def start(self) -> Process:
        log = open(self.log_path, "wb")  # noqa: SIM115 -- closed with the process
        self.popen = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
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


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXYMQ_", "FETCHER_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PROXYMQ_BROKER_URL"] = BROKER_URL
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Stack:
    """Starts processes for one test module and stops them all at the end."""

    def __init__(self) -> None:
        self.processes: list[Process] = []
        self.dir = Path(tempfile.mkdtemp(prefix="proxymq-test-"))

    def run(self, name: str, args: list[str], **env: str) -> Process:
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
        self._await(
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
        self._await(
            process, lambda: consumers(f"{service}_requests") > before, f"worker for {service}"
        )
        return process

    def _await(self, process: Process, condition: Callable[[], bool], what: str) -> None:
        try:
            wait_for(lambda: process.alive() and condition(), 30, what)
        except TimeoutError:
            raise AssertionError(f"{what} did not start:\n{process.log()[-4000:]}") from None

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@dataclass
class Gateway:
    process: Process
    url: str


# -- broker ------------------------------------------------------------------------------


def consumers(queue: str) -> int:
    """Consumers on ``queue``, or -1 when it does not exist."""
    with kombu.Connection(BROKER_URL) as connection:
        try:
            _, _, count = connection.default_channel.queue_declare(queue, passive=True)
        except connection.channel_errors:
            return -1
        return count


class TaskEventsTap:
    """An exclusive queue on Celery's event exchange: every task event any worker sends."""

    def __init__(self, connection: kombu.Connection) -> None:
        from celery.events.event import get_exchange

        self._channel = connection.channel()
        queue = kombu.Queue(
            f"t_events_{uuid.uuid4().hex[:8]}",
            get_exchange(connection),
            routing_key="task.#",
            exclusive=True,
        )
        self._queue = queue(self._channel)
        self._queue.declare()

    def bunches(self) -> list[list[dict]]:
        """The events that arrived since the last call, as they came: one list a message."""
        got = []
        while (message := self._queue.get(no_ack=True)) is not None:
            body = json.loads(message.body)
            got.append(body if isinstance(body, list) else [body])
        return got


def queue_exists(queue: str) -> bool:
    return consumers(queue) >= 0


def delete_queues(*queues: str) -> None:
    with kombu.Connection(BROKER_URL) as connection:
        for queue in queues:
            with contextlib.suppress(Exception):
                connection.channel().queue_delete(queue)


# -- a downstream we can watch -----------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_uri: str
    headers: list[tuple[str, str]]
    body: bytes


class Downstream:
    """A threaded HTTP server in the test process that records every request.

    Paths pick a behaviour: ``/sleep/<s>`` waits, ``/status/<code>`` answers that status,
    ``/bytes/<n>`` answers n bytes with a Content-Length, ``/chunked-bytes/<n>`` chunked,
    ``/close`` drops the connection without answering, ``/health`` answers 200 or 503 as
    ``healthy`` says (and is not recorded); anything else echoes the body.
    """

    def __init__(self) -> None:
        self.healthy = True
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, self._app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Downstream:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()

    def requests_for(self, correlation_id: str) -> list[Seen]:
        with self._lock:
            return [
                s for s in self.seen if dict(s.headers).get("X-Correlation-Id") == correlation_id
            ]

    def _app(self, environ, start_response):
        request = Request(environ)
        if request.path == "/health":
            return Response(status=200 if self.healthy else 503)(environ, start_response)
        body = request.get_data()
        seen = Seen(
            request.method, environ.get("REQUEST_URI", ""), list(request.headers.items()), body
        )
        with self._lock:
            self.seen.append(seen)
        parts = request.path.strip("/").split("/")
        if parts[0] == "sleep":
            time.sleep(float(parts[1]))
        elif parts[0] == "truncate":  # promises 100 bytes, sends 5, hangs up
            sock = environ["werkzeug.socket"]
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            return []
        elif parts[0] == "close":
            environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
            environ["werkzeug.socket"].close()
            return []
        if parts[0] in ("bytes", "chunked-bytes"):  # n bytes, with or without a length
            size = int(parts[1])
            if parts[0] == "bytes":
                return Response(b"b" * size)(environ, start_response)
            return Response(b"b" * 1000 for _ in range(size // 1000))(environ, start_response)
        status = int(parts[1]) if parts[0] == "status" else 200
        if parts[0] == "sized":  # a fixed body, so HEAD has a Content-Length to keep
            body = b"s" * 1234
        response = Response(body, status=status, content_type=request.content_type)
        response.headers["X-Echo-Method"] = request.method
        response.headers["X-Echo-Uri"] = seen.raw_uri
        response.headers.add("Set-Cookie", "first=1")
        response.headers.add("Set-Cookie", "second=2")
        return response(environ, start_response)


@contextlib.contextmanager
def running_stack() -> Iterator[Stack]:
    stack = Stack()
    try:
        yield stack
    finally:
        stack.stop()


# -- a RabbitMQ node of the test's own, to stop and start ----------------------------------


@dataclass(frozen=True)
class TLSListener:
    """A TLS listener's files (PEM) and whether it demands a client certificate."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False


class PrivateBroker:
    """A RabbitMQ node with its own name, port and data directory.

    Tests that stop the broker use one of these, never the shared node on 5672. With
    ``tls`` it also listens for amqps:// on ``tls_port``, with copies of those files.
    """

    def __init__(self, tls: TLSListener | None = None) -> None:
        # Not under pytest's tmp_path: its parents are private to root, and the node runs
        # as the rabbitmq user.
        directory = Path(tempfile.mkdtemp(prefix="proxymq-rabbitmq-"))
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.node = f"proxymq-test-{uuid.uuid4().hex[:8]}@localhost"
        self.dir = directory
        conf = f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
        if tls is not None:
            for name in ("ca_file", "cert_file", "key_file"):
                shutil.copy(getattr(tls, name), directory / f"{name}.pem")
            verify = "verify_peer" if tls.require_client_cert else "verify_none"
            conf += (
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {directory / 'ca_file.pem'}\n"
                f"ssl_options.certfile = {directory / 'cert_file.pem'}\n"
                f"ssl_options.keyfile = {directory / 'key_file.pem'}\n"
                f"ssl_options.verify = {verify}\n"
                f"ssl_options.fail_if_no_peer_cert = {str(tls.require_client_cert).lower()}\n"
            )
        (directory / "rabbitmq.conf").write_text(conf)
        (directory / "enabled_plugins").write_text("[].\n")
        # rabbitmq-server drops root for the rabbitmq user, who must own its data dir.
        if os.geteuid() == 0:
            for path in (directory, *directory.iterdir()):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_PID_FILE": str(directory / "rabbit.pid"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def tls_url(self, host: str = "localhost") -> str:
        return f"amqps://guest:guest@{host}:{self.tls_port}//"

    def _ctl(self, *args: str, timeout: float = 120) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, timeout=60)
        # -detached returns before the node registers; await_startup fails until it has.
        wait_for(lambda: self._ctl("await_startup") is None, 120, f"RabbitMQ node {self.node}", 0.5)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._ctl("stop", timeout=60)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- a private CA, made with openssl at test time ------------------------------------------


@dataclass(frozen=True)
class PKI:
    """A CA and certificates it signed: ``server`` for localhost/127.0.0.1, ``evil`` for
    evil.example only, ``client`` for client authentication. Each is ``(cert, key)``."""

    ca: Path
    server: tuple[Path, Path]
    evil: tuple[Path, Path]
    client: tuple[Path, Path]


def make_pki(directory: Path) -> PKI:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=ProxyMQ test CA")  # fmt: skip

    def leaf(name: str, subject: str, extensions: str) -> tuple[Path, Path]:
        (directory / f"{name}.ext").write_text(extensions)
        openssl("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", subject)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-set_serial", str(uuid.uuid4().int >> 64), "-days", "2",
                "-extfile", f"{name}.ext", "-out", f"{name}.pem")  # fmt: skip
        return directory / f"{name}.pem", directory / f"{name}.key"

    return PKI(
        ca=directory / "ca.pem",
        server=leaf(
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        evil=leaf(
            "evil",
            "/CN=evil.example",
            "subjectAltName=DNS:evil.example\nextendedKeyUsage=serverAuth\n",
        ),
        client=leaf("client", "/CN=proxymq-client", "extendedKeyUsage=clientAuth\n"),
    )

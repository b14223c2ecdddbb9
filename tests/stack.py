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

import amqp
import kombu
import kombu.exceptions
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BROKER_URL = os.environ.get("PROXYMQ_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What a condition may raise while what it awaits is not there yet: a refused or reset
# connection (requests' errors are OSErrors, raise_for_status's too), a broker that is not
# up or has no such queue yet, Redis not up, a rabbitmqctl that fails until its node has
# started. Anything else (a KeyError, a TypeError, a failed assert) is a bug in the test
# or in the code, and ends the wait at once.
NOT_YET: tuple[type[BaseException], ...] = (
    OSError,
    kombu.exceptions.OperationalError,
    amqp.exceptions.AMQPError,
    redis.exceptions.ConnectionError,
    subprocess.SubprocessError,
)


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.05,
    ignoring: tuple[type[BaseException], ...] = NOT_YET,
) -> None:
    """Return once ``condition()`` is true; ``TimeoutError`` (with the last exception
    ``condition`` raised, if any) after ``timeout`` seconds. Only the ``ignoring``
    exceptions count as "not yet"; any other goes through."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except ignoring as exc:
            last = exc
        time.sleep(interval)
    because = f" (last: {type(last).__name__}: {last})" if last is not None else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}{because}")


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

    def _await(self, process: Process, condition: Callable[[], bool], what: str) -> None:
        try:
            wait_for(lambda: process.alive() and condition(), 30, what)
        except TimeoutError as exc:
            log = process.log()[-4000:]
            raise AssertionError(f"{what} did not start ({exc}):\n{log}") from None

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


@contextlib.contextmanager
def broker_user() -> Iterator[tuple[str, str]]:
    """A second broker user, with every permission on the vhost: someone who can read the
    request queues and publish anywhere (a monitoring tool, a compromised service). Yields
    its name and URL; deleted afterwards."""
    name, password = f"intruder-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_user", name, password], check=True, capture_output=True)
    try:
        subprocess.run(
            [*ctl, "set_permissions", "-p", "/", name, ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
        yield name, BROKER_URL.replace("guest:guest", f"{name}:{password}")
    finally:
        subprocess.run([*ctl, "delete_user", name], capture_output=True)


def queue_exists(queue: str) -> bool:
    return consumers(queue) >= 0


def delete_queues(*queues: str) -> None:
    with kombu.Connection(BROKER_URL) as connection:
        for queue in queues:
            with contextlib.suppress(Exception):
                connection.channel().queue_delete(queue)


# -- metrics ----------------------------------------------------------------------------


class Scrape:
    """One scrape in Prometheus text format: ``value(name, **labels)`` sums the samples
    of ``name`` whose labels include ``labels`` (0 when none)."""

    def __init__(self, url: str) -> None:
        self.samples = [
            sample
            for family in text_string_to_metric_families(requests.get(url, timeout=5).text)
            for sample in family.samples
        ]

    @property
    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}

    def value(self, name: str, **labels: str) -> float:
        return sum(
            s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()
        )


# -- a downstream we can watch -----------------------------------------------------------


class RawServer:
    """A TCP server on loopback for a downstream or receiver that must misbehave at the
    byte level, which an HTTP server library would not let it do: every connection goes
    to ``answer`` in a thread of its own. Subclasses set their own state before calling
    ``__init__``, which starts accepting."""

    def __init__(self) -> None:
        self.port = free_port()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()

    def answer(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()


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
    ``healthy`` says (and is not recorded), ``/whoami`` names the Cookie and Authorization
    it got and sets a session cookie of its own for each call; anything else echoes the
    body.
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
        if parts[0] == "whoami":  # an answer only its caller should ever see
            who = {name: request.headers.get(name) for name in ("Cookie", "Authorization")}
            response = Response(json.dumps(who), content_type="application/json")
            response.headers.add("Set-Cookie", f"session={uuid.uuid4().hex}")
            return response(environ, start_response)
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
    """A TLS listener's files (PEM), whether it demands a client certificate, and the
    loopback address it listens on (any of 127.0.0.0/8, so that two nodes can have
    certificates for different addresses)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False
    host: str = "127.0.0.1"


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
                f"listeners.ssl.default = {tls.host}:{self.tls_port}\n"
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
    evil.example only, ``client`` for client authentication, ``only_127_0_0_1`` and
    ``only_127_0_0_2`` for that IP address alone (two nodes of a failover list, each
    valid for its own address only). Each is ``(cert, key)``."""

    ca: Path
    server: tuple[Path, Path]
    evil: tuple[Path, Path]
    client: tuple[Path, Path]
    only_127_0_0_1: tuple[Path, Path]
    only_127_0_0_2: tuple[Path, Path]


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
        only_127_0_0_1=leaf(
            "only1", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        ),
        only_127_0_0_2=leaf(
            "only2", "/CN=127.0.0.2", "subjectAltName=IP:127.0.0.2\nextendedKeyUsage=serverAuth\n"
        ),
    )


# -- a RabbitMQ cluster of the test's own: three nodes on this machine ---------------------


class ClusterNode:
    """One node of a ``PrivateCluster``: its own name, AMQP port, dist port, data dir.

    Run as the rabbitmq user straight from ``/usr/lib/rabbitmq/bin`` (Debian's wrapper in
    /usr/sbin resets HOME to /var/lib/rabbitmq, whose cookie is the shared node's), with
    HOME the cluster's directory, so the node and its rabbitmqctl read the cluster's own
    ``.erlang.cookie``. The node runs in the foreground under our Popen: its PID (the
    Erlang VM's, from the PID file) is what ``kill()`` sends SIGKILL to.
    """

    def __init__(self, cluster: PrivateCluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.port = free_port()
        self.dist_port = free_port()
        self.name = f"proxymq-c{index}-{cluster.tag}@localhost"
        self.dir = cluster.dir / f"n{index}"
        self.dir.mkdir()
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            # A node that lost its peers (killed) must not pause or stop: the test kills one
            # node of three at a time, the other two keep a majority.
            "cluster_partition_handling = ignore\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        self.popen: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/lib/rabbitmq/bin:/usr/bin:/bin",
            "HOME": str(self.cluster.dir),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
        }

    def start(self) -> None:
        """Start the node (returns at once; ``await_startup`` waits for it)."""
        self._log = open(self.dir / "console.log", "ab")  # noqa: SIM115 -- closed in stop()
        self.popen = subprocess.Popen(
            ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
            cwd=self.dir,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self.cluster.as_rabbitmq,
        )

    def ctl(self, *args: str, timeout: float = 60, tool: str = "rabbitmqctl") -> str:
        env = {k: v for k, v in self.env.items() if k != "RABBITMQ_DIST_PORT"}
        done = subprocess.run(
            [f"/usr/lib/rabbitmq/bin/{tool}", "-n", self.name, *args],
            cwd=self.cluster.dir,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            **self.cluster.as_rabbitmq,
        )
        return done.stdout

    def await_startup(self, timeout: float = 120) -> None:
        def started() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                raise AssertionError(f"RabbitMQ node {self.name} exited:\n{self.console()}")
            self.ctl("await_startup", timeout=30)
            return True

        deadline = time.monotonic() + timeout
        while True:
            try:
                started()
                return
            except subprocess.SubprocessError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"RabbitMQ node {self.name} did not start:\n{self.console()}"
                    ) from None
                time.sleep(0.5)

    def console(self) -> str:
        path = self.dir / "console.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    @property
    def vm_pid(self) -> int | None:
        """The Erlang VM's PID (the script that started it is its parent)."""
        try:
            return int((self.dir / "rabbit.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the VM: no goodbye to clients or peers, sockets reset by the kernel."""
        pid = self.vm_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(30)
        with contextlib.suppress(OSError):
            (self.dir / "rabbit.pid").unlink()

    def stop(self) -> None:
        """A clean stop (``rabbitmqctl stop``), then SIGKILL whatever is left."""
        if self.running():
            with contextlib.suppress(subprocess.SubprocessError):
                self.ctl("stop", timeout=60)
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


class PrivateCluster:
    """Three RabbitMQ nodes clustered on this machine, with an Erlang cookie of their own.

    Nodes 1 and 2 join node 0 with ``rabbitmqctl join_cluster``. ``url`` is the three AMQP
    URLs as a ``;`` failover list, ``urls(first)`` the same list starting at node ``first``
    (to spread processes' connections over the nodes). Not under pytest's tmp_path: the
    nodes run as the rabbitmq user, who must read their directories.
    """

    def __init__(self, size: int = 3) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.dir = Path(tempfile.mkdtemp(prefix="proxymq-cluster-"))
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        self.nodes = [ClusterNode(self, i) for i in range(size)]
        if os.geteuid() == 0:
            for path in self.dir.rglob("*"):
                shutil.chown(path, "rabbitmq", "rabbitmq")
            shutil.chown(self.dir, "rabbitmq", "rabbitmq")
            self.as_rabbitmq = {"user": "rabbitmq", "group": "rabbitmq", "extra_groups": []}
        else:
            self.as_rabbitmq = {}

    def urls(self, first: int = 0) -> str:
        order = self.nodes[first:] + self.nodes[:first]
        return ";".join(node.url for node in order)

    @property
    def url(self) -> str:
        return self.urls(0)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.await_startup()
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", seed.name)
            node.ctl("start_app")
        for node in self.nodes:
            node.ctl("await_online_nodes", str(len(self.nodes)), timeout=60)

    def running_nodes(self, via: ClusterNode) -> set[str]:
        """The names of the nodes ``via`` sees running."""
        status = json.loads(via.ctl("cluster_status", "--formatter", "json"))
        return set(status["running_nodes"])

    def node_named(self, name: str) -> ClusterNode:
        return next(node for node in self.nodes if node.name == name)

    def node_on_port(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def restart(self, node: ClusterNode, timeout: float = 120) -> None:
        """Start a stopped or killed node again and wait until every peer sees it."""
        node.start()
        node.await_startup(timeout)
        live = next(other for other in self.nodes if other is not node and other.running())
        wait_for(
            lambda: node.name in self.running_nodes(live), timeout, f"{node.name} to rejoin", 0.5
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def poll_until_done(gateway, location: str, timeout: float = 30, **headers: str):
    """GET a job's ``Location`` until it is no longer 202; the last answer."""
    answers = []

    def done() -> bool:
        answers.append(requests.get(gateway.url + location, headers=headers))
        return answers[-1].status_code != 202

    wait_for(done, timeout, f"job {location}", interval=0.1)
    return answers[-1]

"""The broker as tests see it: the shared node (``BROKER_URL``) and what to ask it (queue
counts, consumers, a second user, Celery's task events), and ``PrivateBroker``, a node of
the test's own to stop and start."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import kombu

from support.names import free_port
from support.pki import TLSListener
from support.waiting import wait_for

BROKER_URL = os.environ.get("PROXYMQ_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


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


def queue_counts(queue: str) -> tuple[int, int]:
    """``(ready, unacknowledged)`` messages of ``queue`` as the broker counts them. A
    passive declare only tells the ready ones; a message a worker holds unacknowledged
    is seen here only (``rabbitmqctl``, like ``broker_user``). ``(-1, -1)``: no queue."""
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    for line in listing.splitlines():
        name, *counts = line.split("\t")
        if name == queue and len(counts) == 2 and all(c.isdigit() for c in counts):
            return int(counts[0]), int(counts[1])
    return -1, -1


def queue_exists(queue: str) -> bool:
    return consumers(queue) >= 0


def delete_queues(*queues: str) -> None:
    with kombu.Connection(BROKER_URL) as connection:
        for queue in queues:
            with contextlib.suppress(Exception):
                connection.channel().queue_delete(queue)


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

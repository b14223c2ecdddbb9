"""A RabbitMQ cluster of the test's own: three nodes on this machine, each one to kill
and restart (tests/cluster, bench/scaling.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from support.names import free_port
from support.waiting import wait_for


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

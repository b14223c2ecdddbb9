"""Fresh names, so that tests (and benchmark runs) sharing a machine never collide: a
free loopback port, a service name of its own (its queue is ``<name>_requests``)."""

from __future__ import annotations

import random
import socket
import uuid

# Below Linux's ephemeral range (32768-60999) and RabbitMQ's distribution ports (25672
# and up): a port from bind(0) is ephemeral, and an outgoing connection of another test
# could take it between this pick and the process's own bind ("Address already in use",
# seen in CI). Here only a listener can, and the bind below sees those.
_PORTS = range(20000, 25000)


def free_port() -> int:
    while True:
        port = random.choice(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def unique_service(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"

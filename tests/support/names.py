"""Fresh names, so that tests (and benchmark runs) sharing a machine never collide: a
free loopback port, a service name of its own (its queue is ``<name>_requests``)."""

from __future__ import annotations

import socket
import uuid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unique_service(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"

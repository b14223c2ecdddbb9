"""Awaiting a condition instead of sleeping: what counts as "not there yet", and the loop."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import amqp
import kombu.exceptions
import redis

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

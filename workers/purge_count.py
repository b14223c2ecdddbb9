"""``proxymq_worker_dead_letters_purged_total``: dead letters purged with ``celery -A
workers deadletters purge``, counted by a worker.

The command is a process of a few seconds that Prometheus never scrapes, so after a
purge it tells one worker serving the service, through Celery's remote control, to add
the count to its counter. One worker, not a broadcast to all: each would count it, and
``sum by (service)`` would show the purge once per worker. The one chosen consumes
``<service>_requests`` now (``inspect active_queues``) and is told once: a lost reply is
not retried on another node, so a purge is counted at most once. When no worker
answers, the purge stands; only its sample is lost, and the command says so.
"""

from __future__ import annotations

import amqp
import kombu.exceptions
from celery import Celery, signals
from celery.worker.control import control_command, nok, ok

from proxymq.parsers import QUEUE_SUFFIX
from workers import metrics

COMMAND = "proxymq_dead_letters_purged"
REPLY_TIMEOUT = 1.0  # seconds; Celery's own default for inspect and control
# More dead letters than any queue holds: a larger count is not a purge's (2 x 10**308
# made the counter inf, and ``increase()`` useless until the worker restarts).
MAX_COUNT = 10**9

# What asking the workers can fail with: no broker, or a user without the remote-control
# permissions (``celery.pidbox``), which the dead letters themselves do not need.
_BROKER_ERRORS = (OSError, kombu.exceptions.KombuError, amqp.exceptions.AMQPError)


class NotCounted(Exception):
    """The purge stands, but no worker counted it; the message says why."""


@control_command(name=COMMAND, args=[("service", str), ("count", int)], signature="<service> <n>")
def dead_letters_purged(state, service: str, count: int) -> dict:
    """Add a purge's count to this worker's counter: only for a service it serves, since
    anyone who may send remote control could otherwise make label values up."""
    if service not in state.consumer.controller.proxymq.config.services:
        return nok(f"this worker does not serve {service!r}")
    if type(count) is not int or not 0 <= count <= MAX_COUNT:
        return nok(f"{count!r} is not a number of dead letters")
    metrics.dead_letters_purged_total.labels(service).inc(count)
    return ok(f"counted {count}")


@signals.worker_ready.connect
def _show(sender=None, **_) -> None:
    """Each served service's series at zero from the start: ``increase()`` sees no rise
    in a series that first appears at N, and a purge is one step, often the only one."""
    for service in sender.controller.proxymq.config.services:
        metrics.dead_letters_purged_total.labels(service)


def record(app: Celery, service: str, count: int) -> str:
    """Have one worker serving ``service`` count ``count`` purged dead letters; the node
    that did, else ``NotCounted``."""
    try:
        nodes = _serving(app, service)
        if not nodes:
            raise NotCounted(f"no worker consuming {service + QUEUE_SUFFIX} answered")
        node = nodes[0]
        replies = app.control.broadcast(
            COMMAND,
            arguments={"service": service, "count": count},
            destination=[node],
            reply=True,
            timeout=REPLY_TIMEOUT,
            limit=1,
        )
    except _BROKER_ERRORS as exc:
        raise NotCounted(f"cannot ask the workers: {exc!r}") from None
    answer = next((reply[node] for reply in replies or [] if node in reply), None)
    if answer is None or "ok" not in answer:
        raise NotCounted(f"{node} did not count it: {answer or 'no answer'}")
    return node


def _serving(app: Celery, service: str) -> list[str]:
    """The workers consuming ``<service>_requests`` now, by node name: a worker gated
    off its service (``workers.health``) is not among them."""
    queue = service + QUEUE_SUFFIX
    active = app.control.inspect(timeout=REPLY_TIMEOUT).active_queues() or {}
    return sorted(
        node for node, queues in active.items() if any(q.get("name") == queue for q in queues)
    )

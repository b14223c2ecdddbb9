"""Task events for ProxyMQ requests, as Celery's own tasks send them.

A request is served without Celery's task machinery (``workers.pipeline``), but
operators still see it as a task: ``task-received`` when a worker takes it,
``task-started`` when its call starts, ``task-succeeded`` (the downstream answered,
whatever its status) or ``task-failed`` (a ProxyMQ error: unreachable, timeout, poison,
a failed batch) once it is answered, and ``task-revoked`` when its deadline passed
unseen. ``uuid`` is the correlation id, ``name`` ``proxymq.forward``, ``args``
``METHOD /service/path``; so Flower's task list and celery-exporter count single and
batch requests alike. They go through Celery's own dispatcher, whose buffer the
consumer sends in bunches (``workers.consumer``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from proxymq.envelope import TASK_NAME, ReplyEnvelope
from workers.delivery import Delivery


class TaskEvents:
    def __init__(self, consumer) -> None:
        self._consumer = consumer  # its dispatcher is replaced on every reconnect

    def _send(self, type_: str, delivery: Delivery, **fields) -> None:
        dispatcher = self._consumer.event_dispatcher
        if dispatcher is not None and dispatcher.enabled:
            dispatcher.send(type_, uuid=delivery.correlation_id, **fields)

    def received(self, delivery: Delivery) -> None:
        self._send(
            "task-received",
            delivery,
            name=TASK_NAME,
            args=delivery.label,
            kwargs="{}",
            root_id=delivery.correlation_id,
            parent_id=None,
            retries=delivery.count - 1,
            eta=None,
            expires=datetime.fromtimestamp(delivery.request.deadline / 1000, UTC).isoformat(),
        )

    def started(self, delivery: Delivery) -> None:
        self._send("task-started", delivery)

    def answered(self, delivery: Delivery, reply: ReplyEnvelope) -> None:
        runtime = time.monotonic() - (delivery.started or delivery.taken)
        if reply.error:
            exception = f"{reply.error}: {reply.message}"
            self._send("task-failed", delivery, exception=exception, traceback="")
        else:
            self._send("task-succeeded", delivery, result=repr(reply.status), runtime=runtime)

    def expired(self, delivery: Delivery) -> None:
        self._send("task-revoked", delivery, terminated=False, signum=None, expired=True)

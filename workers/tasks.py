"""The task behind every request message: call the downstream, publish the reply."""

from __future__ import annotations

import logging
import time

from celery import Task

from proxymq.envelope import TASK_NAME, ReplyEnvelope, RequestEnvelope
from workers import forwarding, runtime
from workers.app import app

log = logging.getLogger(__name__)


def delivery_count(task: Task) -> int:
    """1 on first delivery. Classic queues only say whether a message was redelivered."""
    return 2 if (task.request.delivery_info or {}).get("redelivered") else 1


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def forward(task: Task, wire: dict) -> None:
    state = runtime.current()
    correlation_id = task.request.correlation_id or task.request.id
    reply_to = task.request.reply_to
    try:
        request = RequestEnvelope.from_wire(wire)
    except ValueError as exc:
        reply = ReplyEnvelope(status=400, error="bad-request", message=str(exc))
    else:
        if request.deadline <= time.time() * 1000:
            log.info("dropped expired request %s unseen by the downstream", correlation_id)
            return
        service = state.config.services.get(request.service)
        if service is None:
            reply = forwarding.unavailable(f"this worker does not serve {request.service!r}")
        else:
            reply = forwarding.call(
                state.http, service, request, correlation_id, delivery_count(task)
            )
    if reply_to:
        state.replies.publish(reply_to, correlation_id, reply)

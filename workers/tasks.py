"""The task behind every request message: call the downstream, publish the reply."""

from __future__ import annotations

import logging
import time

from celery import Task
from celery.exceptions import Reject

from proxymq.envelope import (
    DELIVERIES_HEADER,
    SENT_HEADER,
    TASK_NAME,
    RequestEnvelope,
    task_body,
)
from workers import forwarding, metrics, poison, runtime
from workers.admission import Delivery, admit
from workers.answering import answer
from workers.app import app

log = logging.getLogger(__name__)


def _headers(task: Task) -> dict:
    """The message headers that count deliveries (Celery makes headers request attributes)."""
    names = ("x-delivery-count", DELIVERIES_HEADER, SENT_HEADER)
    return {name: getattr(task.request, name, None) for name in names}


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def forward(task: Task, wire: dict) -> None:
    """One request: admit it (``workers.admission``), call the downstream, answer."""
    state = runtime.current()
    context = task.request
    correlation_id = context.correlation_id or context.id
    delivery = context.delivery_info or {}
    queue = delivery.get("routing_key") or ""
    try:
        request = RequestEnvelope.from_wire(wire)
    except ValueError as exc:
        poison.dead_letter(state.publisher, "", queue, task_body([wire]), {}, {}, str(exc))
        answer(state, None, correlation_id, context.reply_to, poison.poison_reply(1))
        return
    service = state.config.services.get(request.service)
    if service is None:
        message = f"this worker does not serve {request.service!r}"
        answer(state, request, correlation_id, context.reply_to, forwarding.unavailable(message))
        return
    admitted = Delivery(
        request=request,
        correlation_id=correlation_id,
        reply_to=context.reply_to,
        queue=queue,
        headers=_headers(task),
        redelivered=bool(delivery.get("redelivered")),
    )
    deliveries = admit(state, service, admitted, hold=not state.health.healthy(service.name))
    if deliveries is None:
        return
    started = time.perf_counter()
    reply = forwarding.call(state.http, service, request, correlation_id, deliveries)
    metrics.downstream_duration.labels(service.name).observe(time.perf_counter() - started)
    metrics.downstream_requests_total.labels(service.name, str(reply.status)).inc()
    try:
        answer(state, request, correlation_id, context.reply_to, reply)
    except Exception as exc:
        # Unanswered must not mean acknowledged (Celery acks failed tasks): back it goes.
        log.exception("could not answer %s; returning it to the queue", correlation_id)
        raise Reject(f"answer failed: {exc!r}", requeue=True) from exc

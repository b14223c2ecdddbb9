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
    task_message,
)
from workers import answering, forwarding, metrics, poison, runtime
from workers.answering import answer
from workers.app import app

log = logging.getLogger(__name__)


def _headers(task: Task) -> dict:
    """The message headers that count deliveries (Celery makes headers request attributes)."""
    names = ("x-delivery-count", DELIVERIES_HEADER, SENT_HEADER)
    return {name: getattr(task.request, name, None) for name in names}


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def forward(task: Task, wire: dict) -> None:
    """One request: admit it (deadline, deliveries, health, job state), call, answer."""
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
    now_ms = time.time() * 1000
    if request.deadline <= now_ms:
        metrics.expired_total.labels(service.name).inc()
        log.info("dropped expired request %s unseen by the downstream", correlation_id)
        return

    headers = _headers(task)
    deliveries = poison.delivery_count(headers, bool(delivery.get("redelivered")))
    sent = poison.sent_time(headers)
    if deliveries > service.max_deliveries:
        body, message_headers, properties = task_message(
            request, correlation_id, context.reply_to, deliveries=deliveries, sent=sent
        )
        reason = f"{deliveries - 1} deliveries, PROXYMQ_MAX_DELIVERIES is {service.max_deliveries}"
        poison.dead_letter(
            state.publisher, service.name, queue, body, message_headers, properties, reason
        )
        reply = poison.poison_reply(deliveries - 1)
        answer(state, request, correlation_id, context.reply_to, reply)
        return
    if delivery.get("redelivered") and headers["x-delivery-count"] is None:
        # Classic queue: persist the count by publishing again (see workers.poison).
        poison.publish_counted(
            state.publisher, queue, request, correlation_id, context.reply_to, deliveries, sent
        )
        return
    if not state.health.healthy(service.name) or (request.job and state.jobs is None):
        # Back to the queue, unanswered, with its delivery count unchanged: the service
        # never saw it (a Reject would count as a delivery and end as poison).
        poison.publish_counted(
            state.publisher, queue, request, correlation_id, context.reply_to, deliveries, sent
        )
        return
    if request.job and not answering.start_job(state, service.name, correlation_id):
        return

    if sent and deliveries == 1:
        metrics.queue_wait.labels(service.name).observe(max(0.0, now_ms - sent) / 1000)
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

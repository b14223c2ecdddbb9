"""Whether one delivery may call the downstream; single and batch mode both ask here.

A delivery is settled without a call when its deadline has passed (dropped unseen),
when it has been delivered more than ``max_deliveries`` times (dead-lettered, answered
``poison``), when a classic queue redelivered it (published again with its count, see
``workers.poison``), when it is held (the downstream is unhealthy, or a job reached a
worker without a result store: back to the queue, count unchanged), or when it is a job
that was cancelled meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from proxymq.config import ServiceConfig
from proxymq.envelope import RequestEnvelope, task_message
from workers import answering, metrics, poison
from workers.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a request message, as the broker handed it over."""

    request: RequestEnvelope
    correlation_id: str
    reply_to: str | None
    queue: str
    headers: dict
    redelivered: bool


def admit(state: Runtime, service: ServiceConfig, delivery: Delivery, hold: bool) -> int | None:
    """The delivery's number when the downstream may be called, else None (settled here)."""
    request = delivery.request
    now_ms = time.time() * 1000
    if request.deadline <= now_ms:
        metrics.expired_total.labels(service.name).inc()
        return None
    deliveries = poison.delivery_count(delivery.headers, delivery.redelivered)
    sent = poison.sent_time(delivery.headers)
    if deliveries > service.max_deliveries:
        _dead_letter(state, service, delivery, deliveries, sent)
        return None
    classic_redelivery = delivery.redelivered and delivery.headers.get("x-delivery-count") is None
    if classic_redelivery or hold or (request.job and state.jobs is None):
        # A classic redelivery goes back with its count raised; a held request with it
        # unchanged (the service never saw it; a reject would count as a delivery).
        poison.publish_counted(
            state.publisher,
            delivery.queue,
            request,
            delivery.correlation_id,
            delivery.reply_to,
            deliveries,
            sent,
        )
        return None
    if request.job and not answering.start_job(state, service.name, delivery.correlation_id):
        return None
    if sent and deliveries == 1:
        metrics.queue_wait.labels(service.name).observe(max(0.0, now_ms - sent) / 1000)
    return deliveries


def _dead_letter(
    state: Runtime, service: ServiceConfig, delivery: Delivery, deliveries: int, sent: int | None
) -> None:
    body, headers, properties = task_message(
        delivery.request,
        delivery.correlation_id,
        delivery.reply_to,
        deliveries=deliveries,
        sent=sent,
    )
    reason = f"{deliveries - 1} deliveries, PROXYMQ_MAX_DELIVERIES is {service.max_deliveries}"
    poison.dead_letter(
        state.publisher, service.name, delivery.queue, body, headers, properties, reason
    )
    reply = poison.poison_reply(deliveries - 1)
    answering.answer(state, delivery.request, delivery.correlation_id, delivery.reply_to, reply)

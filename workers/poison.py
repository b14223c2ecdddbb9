"""Requests that must not loop forever: counting deliveries, and the dead-letter queue.

A request that keeps killing workers is redelivered after each crash. Quorum queues count
deliveries themselves (``x-delivery-count``); classic queues only flag a redelivery, so a
worker that receives a redelivered message publishes it again with its count raised and
acknowledges the original (publish first: nothing is lost if it dies in between). Past
``max_deliveries`` the request goes to ``<service>_requests.dead``, with why, and its
client gets 502 ``poison``. A message that cannot be decoded at all is dead-lettered at
once: another delivery would not decode it either.

Dead-lettering is done here rather than with the queue's ``x-dead-letter-exchange``
because the broker would then also dead-letter every request whose deadline passed in
the queue, burying the real poison among expired requests.
"""

from __future__ import annotations

import logging

from kombu import Queue

from proxymq.envelope import (
    DELIVERIES_HEADER,
    SENT_HEADER,
    ReplyEnvelope,
    RequestEnvelope,
    task_message,
)
from workers import metrics
from workers.publisher import Publisher

log = logging.getLogger(__name__)

DEAD_SUFFIX = ".dead"


def dead_queue(queue: str) -> Queue:
    return Queue(queue + DEAD_SUFFIX, durable=True, no_declare=False)


def delivery_count(headers: dict, redelivered: bool) -> int:
    """This delivery's number, 1 for the first."""
    if headers.get("x-delivery-count") is not None:  # quorum queue: earlier returns
        return int(headers["x-delivery-count"]) + 1
    return int(headers.get(DELIVERIES_HEADER) or 1) + (1 if redelivered else 0)


def poison_reply(deliveries: int) -> ReplyEnvelope:
    return ReplyEnvelope(
        status=502,
        error="poison",
        message=f"the request was dead-lettered after {deliveries} deliveries",
    )


def publish_counted(
    publisher: Publisher,
    queue: str,
    request: RequestEnvelope,
    correlation_id: str,
    reply_to: str | None,
    deliveries: int,
    sent: int | None,
) -> None:
    """Put the request back at the tail of its queue, carrying its delivery count."""
    body, headers, properties = task_message(
        request, correlation_id, reply_to, deliveries=deliveries, sent=sent
    )
    publisher.publish(queue, body, headers, properties)


def dead_letter(
    publisher: Publisher,
    service: str,
    queue: str,
    body: bytes,
    headers: dict,
    properties: dict,
    reason: str,
) -> None:
    """Move a message to ``<queue>.dead`` as it was, with the reason in a header."""
    headers = {**headers, "x-proxymq-dead-reason": reason}
    properties = {k: v for k, v in properties.items() if k != "expiration"}
    properties["delivery_mode"] = 2
    publisher.publish(queue + DEAD_SUFFIX, body, headers, properties, declare=[dead_queue(queue)])
    metrics.dead_lettered_total.labels(service).inc()
    log.warning("dead-lettered a request of %s to %s: %s", service, queue + DEAD_SUFFIX, reason)


def sent_time(headers: dict) -> int | None:
    value = headers.get(SENT_HEADER)
    return int(value) if value else None

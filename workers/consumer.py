"""Celery's consumer, with messages it cannot run dead-lettered instead of dropped.

Celery acknowledges a message it cannot decode and rejects one naming an unknown task or
malformed as a task; either way the message is gone and its client waits for nothing.
Here such a message goes to ``<queue>.dead`` as it was, and a client whose reply queue
the message names gets 502 ``poison`` at once. (Selected with ``worker_consumer``.)
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer as CeleryConsumer

from proxymq.config import QUEUE_SUFFIX
from workers import poison, runtime

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    def on_decode_error(self, message, exc) -> None:
        dead_letter_message(message, f"cannot be decoded: {exc}")

    def on_unknown_message(self, body, message) -> None:
        dead_letter_message(message, "not a Celery task message")

    def on_unknown_task(self, body, message, exc) -> None:
        dead_letter_message(message, f"unknown task: {exc}")

    def on_invalid_task(self, body, message, exc) -> None:
        dead_letter_message(message, f"invalid task message: {exc}")


def dead_letter_message(message, reason: str) -> None:
    queue = (message.delivery_info or {}).get("routing_key") or ""
    service = queue.removesuffix(QUEUE_SUFFIX)
    state = runtime.current()
    properties = {
        key: message.properties[key]
        for key in ("correlation_id", "reply_to", "content_type", "content_encoding")
        if message.properties.get(key)
    }
    try:
        poison.dead_letter(
            state.publisher, service, queue, message.body, message.headers or {}, properties, reason
        )
        reply_to, correlation_id = properties.get("reply_to"), properties.get("correlation_id")
        if reply_to and correlation_id:
            state.publisher.reply(reply_to, correlation_id, poison.poison_reply(1))
    except Exception:
        # Leave it unacknowledged: it comes back when this connection closes.
        log.exception("could not dead-letter a message of %s", queue)
        return
    message.ack()

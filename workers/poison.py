"""The dead-letter step: a message no worker should try again goes to ``<queue>.dead``.

Two kinds of message end here: a request delivered more than ``max_deliveries`` times
(it keeps killing workers, or keeps failing to be answered), and anything on a request
queue that is not a well-formed ProxyMQ request (another delivery would not make it
one). The message is published to ``<queue>.dead`` as it came (body, headers and
properties, without its expiry so it stays for inspection) with ``x-proxymq-dead-reason``,
and the original is acknowledged once the broker holds the copy.

Dead-lettering is done here rather than with the queue's ``x-dead-letter-exchange``
because the broker would then also dead-letter every request whose deadline passed in
the queue, burying the real poison among expired requests.
"""

from __future__ import annotations

import logging

from kombu.message import Message

from proxymq.confirms import Settled
from proxymq.envelope import ReplyEnvelope
from workers import metrics
from workers.publisher import DEAD_SUFFIX, Publisher, properties_of

log = logging.getLogger(__name__)

REASON_HEADER = "x-proxymq-dead-reason"


def dead_letter(
    publisher: Publisher, message: Message, service: str, reason: str, settled: Settled
) -> None:
    queue = (message.delivery_info or {}).get("routing_key", "")
    headers = message.headers if isinstance(message.headers, dict) else {}
    properties = {k: v for k, v in properties_of(message).items() if k != "expiration"}
    properties["delivery_mode"] = 2
    body = message.body if isinstance(message.body, bytes) else bytes(message.body)
    publisher.publish(
        queue + DEAD_SUFFIX, body, {**headers, REASON_HEADER: reason}, properties, settled
    )
    metrics.dead_lettered_total.labels(service).inc()
    log.warning("dead-lettered a message of %s to %s: %r", service, queue + DEAD_SUFFIX, reason)


def poison_reply(deliveries: int) -> ReplyEnvelope:
    if deliveries <= 1:
        message = "the request is malformed and was dead-lettered"
    else:
        message = f"the request was dead-lettered after {deliveries} deliveries"
    return ReplyEnvelope(status=502, error="poison", message=message)

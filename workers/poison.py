"""The dead-letter step: a message no worker should try again goes to ``<queue>.dead``.

Two kinds of message end here: a request delivered more than ``max_deliveries`` times
(it keeps killing workers, or keeps failing to be answered), and anything on a request
queue that is not a well-formed ProxyMQ request (another delivery would not make it
one). The message is published to ``<queue>.dead`` as it came (body, headers and
properties, without its expiry so it stays for inspection) with ``x-proxymq-dead-reason``,
``x-proxymq-dead-at`` (epoch ms) and ``x-proxymq-dead-deliveries`` (what ``celery -A
workers deadletters list`` shows: the queue's own delivery count changes every time a
dead letter is looked at), and the original is acknowledged once the broker holds the copy.

Dead-lettering is done here rather than with the queue's ``x-dead-letter-exchange``
because the broker would then also dead-letter every request whose deadline passed in
the queue, burying the real poison among expired requests.
"""

from __future__ import annotations

import logging
import time
import uuid

from kombu.message import Message

from proxymq.confirms import PUBLISH_ID, Settled
from proxymq.envelope import ReplyEnvelope
from workers import metrics
from workers.delivery import delivery_count
from workers.observers import observe
from workers.publisher import DEAD_SUFFIX, Publisher, properties_of

log = logging.getLogger(__name__)

REASON_HEADER = "x-proxymq-dead-reason"
DEAD_AT_HEADER = "x-proxymq-dead-at"
DEAD_DELIVERIES_HEADER = "x-proxymq-dead-deliveries"


def dead_letter(
    publisher: Publisher, message: Message, service: str, reason: str, settled: Settled
) -> None:
    queue = (message.delivery_info or {}).get("routing_key", "")
    headers = message.headers if isinstance(message.headers, dict) else {}
    properties = {k: v for k, v in properties_of(message).items() if k != "expiration"}
    properties["delivery_mode"] = 2
    redelivered = bool((message.delivery_info or {}).get("redelivered"))
    marks = {
        REASON_HEADER: reason,
        DEAD_AT_HEADER: int(time.time() * 1000),
        DEAD_DELIVERIES_HEADER: delivery_count(headers, redelivered),
        PUBLISH_ID: uuid.uuid4().hex,  # tells it if it comes back unrouted
    }
    publisher.publish(
        queue + DEAD_SUFFIX,
        as_sent(message),
        {**headers, **marks},
        properties,
        settled,
        mandatory=True,  # RETURNED: the dead queue is gone (``Pipeline._dead_settler``)
    )
    observe(metrics.count, metrics.dead_lettered_total, service)
    log.warning("dead-lettered a message of %s to %s: %r", service, queue + DEAD_SUFFIX, reason)


def as_sent(message: Message) -> bytes:
    """The message's body as it was published. The consumer's channel does not decode
    bodies (``workers.consumer``), but a body that reaches here decoded anyway (``str``,
    by its ``content_encoding``) is encoded back the same way, and one that has no
    body at all is empty: the dead letter is published whatever the body is."""
    body = message.body or b""
    if isinstance(body, str):
        try:
            return body.encode(message.content_encoding or "utf-8")
        except (LookupError, UnicodeError):
            return body.encode("utf-8", "surrogateescape")
    return bytes(body)


def poison_reply(deliveries: int) -> ReplyEnvelope:
    if deliveries <= 1:
        message = "the request is malformed and was dead-lettered"
    else:
        message = f"the request was dead-lettered after {deliveries} deliveries"
    return ReplyEnvelope(status=502, error="poison", message=message)

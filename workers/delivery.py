"""A delivery: one request message as a worker holds it, from the broker to its ack.

This is the one type a request has inside a worker, in single and batch mode alike. It is
built once, in the consumer thread, from the Kombu message; everything after (admission,
the batch it goes in, the call, the answer, the ack) reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kombu.message import Message

from proxymq.config import ServiceConfig
from proxymq.envelope import (
    CONTENT_TYPE,
    DELIVERIES_HEADER,
    REPLAYED_HEADER,
    SENT_HEADER,
    TASK_NAME,
    RequestEnvelope,
    request_from_task,
)


class Malformed(ValueError):
    """Not a well-formed ProxyMQ request; ``str()`` says why (it goes in the dead letter)."""


@dataclass(slots=True)
class Delivery:
    message: Message
    service: ServiceConfig
    request: RequestEnvelope
    correlation_id: str
    reply_to: str | None
    count: int  # this delivery's number, 1 for the first
    sent: int | None  # epoch ms of the gateway's publish
    replayed: int | None  # times replayed from the dead-letter queue; None: never
    taken: float  # monotonic: when this worker took it
    due: float  # monotonic: its deadline
    started: float = 0.0  # monotonic: when its call started
    trace: object = None  # its spans while tracing is on (workers.tracing)
    attempt: int = 1  # of its call, with PROXYMQ_RETRIES (workers.flow.retry)
    retry_in: float = 0.0  # seconds until its next attempt, when one is due
    submitter: str = ""  # its job's owner, once its answer is stored: whom its callback is fair to

    @property
    def answers_a_client(self) -> bool:
        """Its answer goes to a reply queue (a job's goes to the result store)."""
        return bool(self.reply_to) and not self.request.job

    @property
    def label(self) -> str:
        """What operators see of it (Celery's ``argsrepr``): never the body or query."""
        return f"{self.request.method} /{self.service.name}{self.request.path}"


def take(message: Message, services: dict[str, ServiceConfig]) -> Delivery:
    """The delivery ``message`` is; ``Malformed`` when it is not a ProxyMQ request for
    the service whose queue it came from."""
    headers = message.headers
    if not isinstance(headers, dict) or headers.get("task") != TASK_NAME:
        raise Malformed(f"not a {TASK_NAME} task message")
    if message.content_type != CONTENT_TYPE:
        raise Malformed(f"content type {message.content_type!r} is not {CONTENT_TYPE}")
    correlation_id = message.properties.get("correlation_id")
    if not isinstance(correlation_id, str) or not correlation_id:
        raise Malformed("no correlation id")
    queue = (message.delivery_info or {}).get("routing_key", "")
    service = services.get(queue)
    if service is None:
        raise Malformed(f"{queue!r} is not a queue this worker serves")
    try:
        request = request_from_task(message.body)
    except ValueError as exc:
        raise Malformed(str(exc)) from None
    if request.service != service.name:
        raise Malformed(f"a request for {request.service!r} on {queue}")
    reply_to = message.properties.get("reply_to")
    taken, now = time.monotonic(), time.time()
    return Delivery(
        message=message,
        service=service,
        request=request,
        correlation_id=correlation_id,
        reply_to=reply_to if isinstance(reply_to, str) and reply_to else None,
        count=delivery_count(headers, bool((message.delivery_info or {}).get("redelivered"))),
        sent=_int(headers.get(SENT_HEADER)),
        replayed=_int(headers.get(REPLAYED_HEADER)),
        taken=taken,
        due=taken + request.deadline / 1000 - now,
    )


def delivery_count(headers: dict, redelivered: bool) -> int:
    """This delivery's number, 1 for the first.

    A quorum queue counts earlier returns itself (``x-delivery-count``); a classic queue
    only flags a redelivery, so workers carry the count in a header of their own when
    they publish a redelivered request again (``workers.admission``).
    """
    native = _int(headers.get("x-delivery-count"))
    if native is not None:
        return native + 1
    return (_int(headers.get(DELIVERIES_HEADER)) or 1) + (1 if redelivered else 0)


def _int(value: object) -> int | None:
    return value if type(value) is int else None

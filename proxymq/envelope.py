"""The envelope: one HTTP request or reply as it travels through RabbitMQ.

This module is the only place that knows the wire format; the gateway and the workers
both go through it.

A request travels as a Celery protocol-2 task message (see Celery's "Message Protocol"
documentation) for the task ``proxymq.forward`` whose single argument is the request
envelope. That keeps the queue readable by Celery workers, Flower and the Celery
exporter. The gateway builds the message itself instead of calling ``send_task``:
``send_task`` would declare the service queue (any URL could then create a queue) and
pays for machinery the request path does not use (routers, argument ``repr``s of
possibly large bodies, result-backend bookkeeping).

Bodies are raw bytes, so the serializer is msgpack (Kombu and Celery support it
natively): JSON would need base64 and cost a third more bytes and a copy each way.
A reply is a plain msgpack map published to the gateway's reply queue.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgpack

from proxymq.headers import Headers

TASK_NAME = "proxymq.forward"
# Deliveries so far, counted by the workers (classic queues only flag redeliveries).
DELIVERIES_HEADER = "proxymq_deliveries"
SENT_HEADER = "proxymq_sent"
CONTENT_TYPE = "application/x-msgpack"
CONTENT_ENCODING = "binary"

# Celery protocol 2: the third element of the body ("embed") names workflow links.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"gateway@{socket.gethostname()}"


@dataclass(slots=True)
class RequestEnvelope:
    """One client request, as the downstream should see it.

    ``path`` and ``query`` are raw (still percent-encoded) so they reach the downstream
    exactly as the client wrote them; ``headers`` are end-to-end headers only.
    ``deadline`` is epoch milliseconds: past it, no client waits for the answer.
    A ``job`` (``Prefer: respond-async``) stores its answer in the result store instead
    of replying, and optionally POSTs it to ``callback``.
    """

    service: str
    method: str
    path: str
    query: str
    headers: Headers
    body: bytes
    deadline: int
    job: bool = False
    callback: str | None = None

    def to_wire(self) -> dict:
        return {
            "service": self.service,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": self.body,
            "deadline": self.deadline,
            "job": self.job,
            "callback": self.callback,
        }

    @classmethod
    def from_wire(cls, wire: dict) -> RequestEnvelope:
        """Rebuild a request; raise ``ValueError`` when the message is not one."""
        try:
            return cls(
                service=str(wire["service"]),
                method=str(wire["method"]),
                path=str(wire["path"]),
                query=str(wire["query"]),
                headers=[(str(name), str(value)) for name, value in wire["headers"]],
                body=bytes(wire["body"]),
                deadline=int(wire["deadline"]),
                job=bool(wire.get("job", False)),
                callback=str(wire["callback"]) if wire.get("callback") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed request envelope: {exc!r}") from exc


@dataclass(slots=True)
class ReplyEnvelope:
    """The answer for one request.

    Either the downstream's answer (``error`` is None) or a failure the worker names
    with one of SPEC.md's error codes, which the gateway renders as its own error.
    """

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    error: str | None = None
    message: str = ""


def task_message(
    request: RequestEnvelope,
    correlation_id: str,
    reply_to: str | None,
    deliveries: int = 1,
    sent: int | None = None,
) -> tuple[bytes, dict, dict]:
    """Return ``(body, headers, properties)`` of the Celery task message for ``request``.

    ``deliveries`` and ``sent`` (epoch ms of the gateway's publish) are given when a
    worker publishes the request again, to keep counting its deliveries.
    """
    now = int(time.time() * 1000)
    expires = datetime.fromtimestamp(request.deadline / 1000, tz=UTC).isoformat()
    headers = {
        "lang": "py",
        "task": TASK_NAME,
        "id": correlation_id,
        "root_id": correlation_id,
        "parent_id": None,
        "group": None,
        "eta": None,
        "expires": expires,
        "retries": 0,
        "timelimit": [None, None],
        "ignore_result": True,
        "argsrepr": f"{request.method} /{request.service}{request.path}",
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "x-proxymq-deadline": request.deadline,
        DELIVERIES_HEADER: deliveries,
        SENT_HEADER: sent or now,
    }
    # The broker drops the message once nobody waits for its answer any more. Synchronous
    # requests are transient: their reply queue dies with the broker anyway, and
    # persisting them would cost a disk write each for nothing. Jobs persist.
    properties = {
        "correlation_id": correlation_id,
        "content_type": CONTENT_TYPE,
        "content_encoding": CONTENT_ENCODING,
        "delivery_mode": 2 if request.job else 1,
        "expiration": str(max(1, request.deadline - now)),
    }
    if reply_to:
        properties["reply_to"] = reply_to
    return task_body([request.to_wire()]), headers, properties


def task_body(args: list) -> bytes:
    """The body of a Celery protocol-2 message with positional ``args``."""
    return msgpack.packb([args, {}, _EMBED], use_bin_type=True)


def encode_reply(reply: ReplyEnvelope) -> bytes:
    wire: dict = {"status": reply.status, "headers": reply.headers, "body": reply.body}
    if reply.error:
        wire["error"] = reply.error
        wire["message"] = reply.message
    return msgpack.packb(wire, use_bin_type=True)


def decode_reply(data: bytes) -> ReplyEnvelope:
    """Rebuild a reply; raise ``ValueError`` when the bytes are not one."""
    try:
        wire = msgpack.unpackb(data, raw=False)
        return ReplyEnvelope(
            status=int(wire["status"]),
            headers=[(str(name), str(value)) for name, value in wire["headers"]],
            body=bytes(wire["body"]),
            error=wire.get("error"),
            message=str(wire.get("message", "")),
        )
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed reply envelope: {exc!r}") from exc

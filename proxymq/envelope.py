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

A streamed reply (``text/event-stream``, or chunked without a length) is several
messages to that queue, told apart by the ``x-proxymq-stream`` header: a ``head`` (the
reply map with an empty body: status and headers), then ``chunk``s (raw body bytes),
then ``end``, or ``abort`` when the downstream failed midway. Every part carries the
stream's id, new for each attempt, so a redelivered request's parts can never be
spliced into a stream already under way, and its number in the stream (the head 0, then
1, 2, ...), so a part lost or overtaken on the way (a worker's publishes move to a
fresh channel after a nack, and order holds only within a channel) is noticed and the
stream cut off instead of delivered with a hole. The head names the worker's cancel
queue (``proxymq.cancel.<hex>``).

A cancel is an empty message to that queue with the stream's correlation id and, as a
header, its stream id: the stream id travels only to the gateway's exclusive reply
queue, so whoever else can publish to the cancel queue still cannot name a stream.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgpack

from proxymq.headers import Headers

TASK_NAME = "proxymq.forward"
# Deliveries so far, counted by the workers (classic queues only flag redeliveries);
# absent on the first.
DELIVERIES_HEADER = "proxymq_deliveries"
SENT_HEADER = "proxymq_sent"
# How many times an operator replayed this request from its dead-letter queue
# (``celery -A workers deadletters replay``); the downstream sees X-ProxyMQ-Replayed.
REPLAYED_HEADER = "x-proxymq-replayed"
CONTENT_TYPE = "application/x-msgpack"
CONTENT_ENCODING = "binary"

# Streamed replies (see above): the part's kind, its stream, its number, where to cancel.
STREAM_HEADER = "x-proxymq-stream"
STREAM_ID_HEADER = "x-proxymq-stream-id"
STREAM_SEQ_HEADER = "x-proxymq-stream-seq"
CANCEL_TO_HEADER = "x-proxymq-cancel-to"
HEAD, CHUNK, END, ABORT = "head", "chunk", "end", "abort"
CANCEL_QUEUE_PREFIX = "proxymq.cancel."
_CANCEL_QUEUE = re.compile(re.escape(CANCEL_QUEUE_PREFIX) + "[0-9a-f]{32}")

# Celery protocol 2: the third element of the body ("embed") names workflow links.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"gateway@{socket.gethostname()}"


@dataclass(slots=True)
class RequestEnvelope:
    """One client request, as the downstream should see it.

    ``path`` and ``query`` are raw (still percent-encoded) so they reach the downstream
    exactly as the client wrote them; ``query`` is None when the target had no ``?``
    (``/x?`` and ``/x`` are different targets). ``headers`` are end-to-end headers only.
    ``deadline`` is epoch milliseconds: past it, no client waits for the answer.
    A ``job`` (``Prefer: respond-async``) stores its answer in the result store instead
    of replying, and optionally POSTs it to ``callback``.
    """

    service: str
    method: str
    path: str
    query: str | None
    headers: Headers
    body: bytes
    deadline: int
    job: bool = False
    callback: str | None = None
    # The AMQP message priority (``X-ProxyMQ-Priority``); a property, not in the body.
    priority: int | None = None

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
    def from_wire(cls, wire: object) -> RequestEnvelope:
        """Rebuild a request; ``ValueError`` naming the first problem when it is not one.

        Strict on purpose: a worker must tell a malformed message from a request (and
        dead-letter it) before anything acts on it, not fail halfway through a call.
        """
        if not isinstance(wire, dict):
            raise ValueError("the request envelope is not a map")
        missing = sorted(_FIELDS - wire.keys())
        if missing:
            raise ValueError(f"the request envelope lacks {', '.join(missing)}")
        headers = wire["headers"]
        callback = wire.get("callback")
        problems = [
            name
            for name, ok in (
                ("service", isinstance(wire["service"], str)),
                ("method", wire["method"] in METHODS),
                ("path", isinstance(wire["path"], str) and wire["path"].startswith("/")),
                ("query", wire["query"] is None or isinstance(wire["query"], str)),
                ("headers", isinstance(headers, list) and all(map(_is_header, headers))),
                ("body", isinstance(wire["body"], bytes)),
                ("deadline", type(wire["deadline"]) is int),
                ("job", isinstance(wire.get("job", False), bool)),
                ("callback", callback is None or isinstance(callback, str)),
            )
            if not ok
        ]
        if problems:
            raise ValueError(f"the request envelope has a malformed {problems[0]}")
        return cls(
            service=wire["service"],
            method=wire["method"],
            path=wire["path"],
            query=wire["query"],
            headers=[(name, value) for name, value in headers],
            body=wire["body"],
            deadline=wire["deadline"],
            job=wire.get("job", False),
            callback=callback or None,
        )


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_FIELDS = frozenset({"service", "method", "path", "query", "headers", "body", "deadline"})


def _is_header(pair: object) -> bool:
    return (
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and isinstance(pair[0], str)
        and isinstance(pair[1], str)
    )


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
    request: RequestEnvelope, correlation_id: str, reply_to: str | None
) -> tuple[bytes, dict, dict]:
    """Return ``(body, headers, properties)`` of the Celery task message for ``request``.

    ``reply_to`` is the queue that waits for the answer (None for a job, whose answer
    goes to the result store).
    """
    now = int(time.time() * 1000)
    expires = datetime.fromtimestamp(request.deadline / 1000, tz=UTC).isoformat()
    # Celery's protocol-2 headers that say something; those it reads with a default
    # (group, eta, retries, timelimit, ignore_result) are left out: every header is
    # encoded by the gateway and decoded by the worker on every request.
    headers = {
        "lang": "py",
        "task": TASK_NAME,
        "id": correlation_id,
        "root_id": correlation_id,
        "parent_id": None,
        "expires": expires,
        "argsrepr": f"{request.method} /{request.service}{request.path}",
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        SENT_HEADER: now,
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
    if request.priority is not None:
        properties["priority"] = request.priority
    return task_body([request.to_wire()]), headers, properties


def task_body(args: list) -> bytes:
    """The body of a Celery protocol-2 message with positional ``args``."""
    return msgpack.packb([args, {}, _EMBED], use_bin_type=True)


def request_from_task(body: bytes) -> RequestEnvelope:
    """The request a task message body carries; ``ValueError`` when it carries none."""
    try:
        decoded = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise ValueError(
            f"cannot be decoded: the body is not msgpack ({type(exc).__name__})"
        ) from None
    if not (isinstance(decoded, list) and len(decoded) == 3):
        raise ValueError("the body is not a Celery protocol-2 task body")
    args, kwargs, _ = decoded
    if not isinstance(args, list) or len(args) != 1 or kwargs:
        raise ValueError(f"{TASK_NAME} takes one request envelope and no keyword arguments")
    return RequestEnvelope.from_wire(args[0])


def recounted(headers: dict, properties: dict, deliveries: int, deadline: int) -> tuple[dict, dict]:
    """Headers and properties of a request published again by a worker: its delivery
    count carried along, its expiry what is left of the deadline."""
    left = max(1, deadline - int(time.time() * 1000))
    return {**headers, DELIVERIES_HEADER: deliveries}, {**properties, "expiration": str(left)}


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


@dataclass(frozen=True, slots=True)
class StreamPart:
    """What the headers of one part of a streamed reply say.

    ``seq`` is None for a part from a worker that did not number its parts (older than
    the numbers); such a stream is taken as before, unchecked.
    """

    kind: str
    stream_id: str
    seq: int | None = None
    cancel_to: str = ""

    def headers(self) -> dict:
        headers = {STREAM_HEADER: self.kind, STREAM_ID_HEADER: self.stream_id}
        if self.seq is not None:
            headers[STREAM_SEQ_HEADER] = self.seq
        if self.cancel_to:
            headers[CANCEL_TO_HEADER] = self.cancel_to
        return headers

    @classmethod
    def of(cls, headers: dict | None) -> StreamPart | None:
        """The part a reply's headers describe; None for a whole (unstreamed) reply."""
        kind = headers.get(STREAM_HEADER) if headers else None
        if kind is None:
            return None
        seq = headers.get(STREAM_SEQ_HEADER)
        return cls(
            kind=str(kind),
            stream_id=str(headers.get(STREAM_ID_HEADER)),
            # Not a number: a part out of any order, which the stream refuses.
            seq=seq if seq is None or type(seq) is int else -1,
            cancel_to=str(headers.get(CANCEL_TO_HEADER) or ""),
        )


def new_cancel_queue() -> str:
    """A name for a worker connection's cancel queue."""
    return CANCEL_QUEUE_PREFIX + uuid.uuid4().hex


def is_cancel_queue(name: str) -> bool:
    """Whether ``name`` can be a worker's cancel queue: the only queue a gateway sends a
    cancel to, whatever a head names (a forged head must not make it publish elsewhere)."""
    return _CANCEL_QUEUE.fullmatch(name) is not None


def cancel_headers(stream_id: str) -> dict:
    """The headers of a cancel: the stream it is for (see above)."""
    return {STREAM_ID_HEADER: stream_id}


def cancelled_stream(headers: dict | None) -> str | None:
    """The stream id a cancel names; None when it names none."""
    stream_id = headers.get(STREAM_ID_HEADER) if headers else None
    return stream_id if isinstance(stream_id, str) and stream_id else None

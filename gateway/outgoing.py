"""The message side of a request: its envelope (``ProxyRequest.envelope``) published
with confirms, and the wait for its reply."""

from __future__ import annotations

import time

import gevent

from gateway import errors
from gateway.broker import BrokerLink, BrokerUnavailable
from gateway.replies import StreamStart
from gateway.streams import Stream
from proxymq import tracing
from proxymq.confirms import NACK, RETURNED
from proxymq.envelope import ReplyEnvelope, RequestEnvelope, decode_reply, task_message
from proxymq.parsers import queue_name


def exchange(
    link: BrokerLink, envelope: RequestEnvelope, correlation_id: str, wait: float
) -> tuple[ReplyEnvelope, Stream | None]:
    """Publish the request and wait for its reply, at most ``wait`` seconds in all: the
    reply, or a streamed reply's head and its stream (``gateway.streams``)."""
    give_up = time.monotonic() + wait
    waiter = link.replies.expect(correlation_id)
    try:
        publish(link, envelope, correlation_id, wait, link.reply_queue)
        data = waiter.get(timeout=max(0.0, give_up - time.monotonic()))
    except gevent.Timeout:
        raise errors.timeout(wait) from None
    except BrokerUnavailable as exc:
        raise errors.broker_unavailable(str(exc)) from None
    finally:
        link.replies.forget(correlation_id)
    stream = None
    if isinstance(data, StreamStart):
        data, stream = data.head, data.stream
    try:
        return decode_reply(data), stream
    except ValueError:
        if stream is not None:
            link.end_stream(correlation_id, stream)
        raise errors.BAD_REPLY("the worker's reply is malformed") from None


def publish(
    link: BrokerLink,
    envelope: RequestEnvelope,
    correlation_id: str,
    wait: float,
    reply_to: str | None,
) -> None:
    """Publish the request's message; an unroutable or refused one is the gateway's error.

    Raises ``BrokerUnavailable`` and ``gevent.Timeout`` (no confirm in time) for the
    caller to name, since a synchronous request and a job name them differently.
    """
    if reply_to is None and not envelope.job:
        raise BrokerUnavailable("not connected to the broker")
    body, headers, properties = task_message(envelope, correlation_id, reply_to)
    queue = queue_name(envelope.service)
    if tracing.ENABLED:
        from gateway import tracing as traced

        outcome = traced.publish(link, queue, body, headers, properties, wait)
    else:
        outcome = link.publish(queue, body, headers, properties, wait)
    if outcome == RETURNED:
        raise errors.unknown_service(envelope.service)
    if outcome == NACK:
        raise errors.queue_full(envelope.service)

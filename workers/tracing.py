"""A worker's spans for one delivery: queue wait, processing, the downstream call, the reply.

Only used while tracing is on (``proxymq.tracing.ENABLED``); ``Delivery.trace`` is None
otherwise. The message's headers carry the gateway's publish span (``traceparent``);
every span here belongs to that trace, so a redelivered message's second attempt lands
in the same trace as its first.

- ``queue wait <queue>`` (consumer, operation ``receive``): from the gateway's publish
  time (the message's ``proxymq_sent`` header) to this worker's receipt. A span rather
  than only an attribute so the wait shows as a bar between publish and processing in
  a trace view; the gateway's clock is the start, so the figure is only as good as the
  two hosts' clock agreement (a negative wait is clamped to zero). The process span
  also carries it as ``proxymq.queue.wait_ms``.
- ``process <queue>`` (consumer, operation ``process``): from receipt until the message
  is settled (its reply confirmed by the broker, or acknowledged, requeued, dead-lettered).
- ``<METHOD>`` (client): one single call to the downstream, whose ``traceparent`` names
  it as the parent; a batch call is one ``POST batch <service>`` client span in a trace
  of its own, with a link to every item's process span.
- ``publish <reply queue>`` (producer): the reply, from its publish to the broker's confirm.

Nothing here reads a span back: a request the sampler left out (a client's
``traceparent`` with its sampled flag off, a ratio sampler) has non-recording spans,
which keep no attributes. What a later span needs (the correlation id) is kept on the
``DeliveryTrace`` itself. Every function here is an observer: the pipeline calls it
through ``workers.observers``, after the step it watches, so a failure here loses a span,
never an answer or an ack.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from opentelemetry import context, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from proxymq import tracing
from proxymq.confirms import ACK
from proxymq.envelope import ReplyEnvelope

_tracer = trace.get_tracer("proxymq.worker")


class DeliveryTrace:
    """The spans of one delivery; made in the consumer thread at receipt."""

    __slots__ = ("call_context", "context", "correlation_id", "process")

    def __init__(self, delivery) -> None:
        queue, correlation_id = delivery.service.queue, delivery.correlation_id
        self.correlation_id = correlation_id
        parent = tracing.extract(delivery.message.headers or {})
        now = time.time_ns()
        attributes = {
            **tracing.messaging("process", queue, correlation_id),
            "messaging.message.id": correlation_id,
            "proxymq.service": delivery.service.name,
            "proxymq.delivery.count": delivery.count,
        }
        if delivery.sent:
            sent = min(delivery.sent * 1_000_000, now)
            attributes["proxymq.queue.wait_ms"] = (now - sent) / 1e6
            wait = _tracer.start_span(
                f"queue wait {queue}",
                context=parent,
                kind=SpanKind.CONSUMER,
                start_time=sent,
                attributes={
                    **tracing.messaging("receive", queue, correlation_id),
                    "proxymq.delivery.count": delivery.count,
                },
            )
            wait.end(end_time=now)
        self.process = _tracer.start_span(
            f"process {queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            start_time=now,
            attributes=attributes,
        )
        self.context = trace.set_span_in_context(self.process)
        self.call_context = None  # the single call's client span, while it runs

    def end(self, reply: ReplyEnvelope | None, outcome: str) -> None:
        """The message is settled (or left to the broker): the processing is over."""
        span = self.process
        span.set_attribute("proxymq.outcome", outcome)
        if reply is not None:
            span.set_attribute("http.response.status_code", reply.status)
            tracing.fail(span, reply.error, reply.message)
        span.end()

    def replying(self, reply_to: str, reply: ReplyEnvelope) -> Callable[[str], None]:
        """Start the reply's producer span; the returned ``sent(outcome)`` ends it (and
        the processing) once the broker has answered for the reply and the request is
        settled."""
        span = _tracer.start_span(
            f"publish {reply_to}",
            context=self.context,
            kind=SpanKind.PRODUCER,
            attributes=tracing.messaging("publish", reply_to, self.correlation_id),
        )

        def sent(outcome: str) -> None:
            span.set_attribute("proxymq.publish.outcome", outcome)
            if outcome != ACK:
                span.set_status(Status(StatusCode.ERROR, f"reply {outcome}"))
            span.end()
            self.end(reply, "replied")

        return sent


def received(delivery) -> None:
    delivery.trace = DeliveryTrace(delivery)


def propagation(delivery) -> list[tuple[str, str]]:
    """``traceparent`` (and ``tracestate``) for the downstream: its parent is the single
    call's client span, or for a batch item, the item's own process span."""
    traced = delivery.trace
    if traced is None:
        return []
    return list(tracing.inject(traced.call_context or traced.context).items())


def _client_attributes(url: str, method: str) -> dict:
    parts = urlsplit(url)
    return {
        "http.request.method": method,
        "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if parts.scheme == "https" else 80),
        "url.scheme": parts.scheme,
    }


@contextlib.contextmanager
def single_call(delivery) -> Iterator[Callable[[object], None]]:
    """The client span of one single call (in the call thread); yields ``done(result)``."""
    traced = delivery.trace
    if traced is None:
        yield lambda result: None
        return
    request = delivery.request
    attributes = _client_attributes(delivery.service.downstream_url, request.method)
    attributes["url.path"] = urlsplit(delivery.service.downstream_url).path.rstrip("/") + (
        request.path
    )
    attributes[tracing.CORRELATION_ID] = delivery.correlation_id
    span = _tracer.start_span(
        request.method, context=traced.context, kind=SpanKind.CLIENT, attributes=attributes
    )
    traced.call_context = trace.set_span_in_context(span)
    token = context.attach(traced.call_context)

    def done(result) -> None:
        reply = getattr(result, "head", result)  # a stream's head
        if isinstance(reply, ReplyEnvelope):
            _answered(span, reply)

    try:
        with tracing.request_log_context(delivery.correlation_id, span):
            yield done
    finally:
        context.detach(token)
        traced.call_context = None
        span.end()


@contextlib.contextmanager
def batch_call(service, batch: list) -> Iterator[Callable[[dict], None]]:
    """One client span for a batch call, linked to every item's processing; yields
    ``done(replies)``."""
    links = [Link(d.trace.process.get_span_context()) for d in batch if d.trace is not None]
    attributes = _client_attributes(service.batch_url or "", "POST")
    attributes["url.path"] = urlsplit(service.batch_url or "").path
    attributes["proxymq.batch.size"] = len(batch)
    attributes["proxymq.service"] = service.name
    span = _tracer.start_span(
        f"POST batch {service.name}",
        context=context.Context(),  # a root: the batch belongs to no one item's trace
        kind=SpanKind.CLIENT,
        links=links,
        attributes=attributes,
    )
    token = context.attach(trace.set_span_in_context(span))
    ids = f"{batch[0].correlation_id}(+{len(batch) - 1})" if batch else ""

    def done(replies: dict) -> None:
        errors = sorted({r.error for r in replies.values() if r.error})
        if errors:
            tracing.fail(span, errors[0], f"{len(errors)} kind(s) of item error")

    try:
        with tracing.request_log_context(ids, span):
            yield done
    finally:
        context.detach(token)
        span.end()


def _answered(span, reply: ReplyEnvelope) -> None:
    span.set_attribute("http.response.status_code", reply.status)
    if reply.error:
        tracing.fail(span, reply.error, reply.message)
    elif reply.status >= 500:
        span.set_status(Status(StatusCode.ERROR))

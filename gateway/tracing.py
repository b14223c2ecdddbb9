"""The gateway's spans: the client's request (server) and its publish (producer).

Only called while tracing is on (``proxymq.tracing.ENABLED``). The request's span is
the current span of the request's greenlet while it is handled, so the publish span is
its child and the message carries the publish span's context.
"""

from __future__ import annotations

from opentelemetry import context, trace
from opentelemetry.trace import SpanKind

from gateway import errors
from proxymq import tracing
from proxymq.confirms import NACK, RETURNED

_tracer = trace.get_tracer("proxymq.gateway")


class RequestSpan:
    """The server span of one proxied request, current until ``end``."""

    __slots__ = ("_logs", "_span", "_token")

    def __init__(self, environ: dict, service: str, path: str, method: str, correlation_id: str):
        parent = tracing.extract(
            {
                name: environ[key]
                for name in tracing.PROPAGATED
                if (key := "HTTP_" + name.upper()) in environ
            }
        )
        server = environ.get("SERVER_NAME", "")
        port = environ.get("SERVER_PORT", "")
        self._span = _tracer.start_span(
            f"{method} /{service}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": f"/{service}{path}",
                "url.scheme": environ.get("wsgi.url_scheme", "http"),
                "server.address": server,
                "server.port": int(port) if port.isdigit() else 0,
                "http.route": f"/{service}/*",
                "client.address": environ.get("REMOTE_ADDR", ""),
                "user_agent.original": environ.get("HTTP_USER_AGENT", ""),
                "proxymq.service": service,
                tracing.CORRELATION_ID: correlation_id,
            },
        )
        self._token = context.attach(trace.set_span_in_context(self._span))
        self._logs = tracing.request_log_context(correlation_id, self._span)
        self._logs.__enter__()

    def end(self, status: int, code: str | None) -> None:
        span = self._span
        span.set_attribute("http.response.status_code", status)
        if code:
            tracing.fail(span, code)
        elif status >= 500:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        self._logs.__exit__(None, None, None)
        context.detach(self._token)
        span.end()


def publish(link, queue: str, body: bytes, headers: dict, properties: dict, wait: float) -> str:
    """``link.publish`` inside a producer span whose context the message carries."""
    correlation_id = properties.get("correlation_id", "")
    with _tracer.start_as_current_span(
        f"publish {queue}",
        kind=SpanKind.PRODUCER,
        attributes=tracing.messaging("publish", queue, correlation_id),
    ) as span:
        headers.update(tracing.inject())
        outcome = link.publish(queue, body, headers, properties, wait)
        span.set_attribute("proxymq.publish.outcome", outcome)
        if outcome == RETURNED:
            tracing.fail(span, errors.UNKNOWN_SERVICE.code, "no queue took the message")
        elif outcome == NACK:
            tracing.fail(span, errors.QUEUE_FULL.code, "the broker refused the message")
        return outcome

"""Tracing: OpenTelemetry spans from the client to the downstream and back.

On or off once per process, at start (``TracingConfig.from_env``): tracing is on iff
``OTEL_TRACES_EXPORTER`` is set to something other than ``none`` (and ``OTEL_SDK_DISABLED``
is not ``true``). Off, the SDK is never imported, no span is made and the request path
only reads ``ENABLED``: a process without the variables pays nothing. On, ``setup`` builds
the SDK's tracer provider with a batch span processor and the exporters the standard
variables name (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``... are the SDK's
own to read), and defaults ``OTEL_SERVICE_NAME`` to the process's ProxyMQ name.

Context travels as W3C ``traceparent`` / ``tracestate`` (``OTEL_PROPAGATORS`` may change
that): from the client's HTTP headers, in the task message's headers, to the downstream's
HTTP headers. Log lines written while a request is being handled carry its correlation
id and trace id (``request_log_context``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from proxymq.parsers import boolean, read

EXPORTERS = frozenset({"otlp", "console", "none"})
GATEWAY, WORKER, FETCHER = "proxymq-gateway", "proxymq-worker", "proxymq-fetcher"
ERROR_CODE = "proxymq.error.code"
CORRELATION_ID = "messaging.message.conversation_id"

# Set by ``setup``: read on every request, so a plain module attribute.
ENABLED = False


def _exporters(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(names) - EXPORTERS)
    if unknown or not names:
        raise ValueError(f"must be a comma-separated list of {sorted(EXPORTERS)}, bad: {unknown}")
    return tuple(name for name in names if name != "none")


@dataclass(frozen=True, slots=True)
class TracingConfig:
    exporters: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TracingConfig:
        if read(env, "OTEL_SDK_DISABLED", boolean, False):
            return cls()
        return cls(exporters=read(env, "OTEL_TRACES_EXPORTER", _exporters, ()))


def setup(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Start exporting spans in this process when the variables ask for it; True if so.

    Call after any fork (a batch span processor's thread does not survive one), once.
    """
    global ENABLED
    env = os.environ if env is None else env
    config = TracingConfig.from_env(env)
    if not config.enabled or ENABLED:
        return ENABLED
    os.environ.setdefault("OTEL_SERVICE_NAME", service_name)
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create())
    for name in config.exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _install_log_context()
    ENABLED = True
    return True


def check(env: Mapping[str, str]) -> None:
    """Validate the variables (``ConfigError``) without setting anything up: for a
    gunicorn master, which must not start threads before it forks."""
    TracingConfig.from_env(env)


def shutdown() -> None:
    """Export what is still buffered (a process about to exit)."""
    if ENABLED:
        from opentelemetry import trace

        with contextlib.suppress(Exception):
            trace.get_tracer_provider().shutdown()


def tracer(name: str):
    from opentelemetry import trace

    return trace.get_tracer(name)


# -- propagation ---------------------------------------------------------------------------

PROPAGATED = ("traceparent", "tracestate")


def inject(context=None) -> dict[str, str]:
    """The propagation headers for ``context`` (default: the current one)."""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping) -> object:
    """The context ``carrier`` (a message's headers, lower-cased HTTP headers) carries."""
    from opentelemetry import propagate

    return propagate.extract({k: v for k, v in carrier.items() if isinstance(v, str)})


def fail(span, code: str | None, message: str = "") -> None:
    """Mark ``span`` failed with ProxyMQ's error ``code`` (docs/reference.md)."""
    if not code:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute(ERROR_CODE, code)
    span.set_status(Status(StatusCode.ERROR, message or code))


def messaging(operation: str, destination: str, correlation_id: str) -> dict:
    """The messaging semantic-convention attributes of one operation on one queue."""
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": destination,
        "messaging.rabbitmq.destination.routing_key": destination,
        CORRELATION_ID: correlation_id,
    }


# -- log lines -----------------------------------------------------------------------------

_request_ids: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "proxymq_request_ids", default=None
)


@contextlib.contextmanager
def request_log_context(correlation_id: str, span=None) -> Iterator[None]:
    """Log lines written inside carry ``correlation_id`` and the trace id of ``span``
    (default: the current span). Only while tracing is on."""
    if not ENABLED:
        yield
        return
    if span is None:
        from opentelemetry import trace

        span = trace.get_current_span()
    trace_id = format(span.get_span_context().trace_id, "032x")
    token = _request_ids.set((correlation_id, trace_id))
    try:
        yield
    finally:
        _request_ids.reset(token)


def _install_log_context() -> None:
    """Append ``[correlation_id=... trace_id=...]`` to every log record made inside
    ``request_log_context``, whatever the handler's format (gunicorn's, Celery's)."""
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        ids = _request_ids.get()
        if ids is not None:
            record.correlation_id, record.trace_id = ids
            if isinstance(record.msg, str):
                # Hex digits and a UUID: no "%" for ``getMessage`` to misread.
                record.msg += " [correlation_id={} trace_id={}]".format(*ids)
        return record

    logging.setLogRecordFactory(factory)


# -- instrumentation packages --------------------------------------------------------------


def instrument_flask(app, excluded: str = "healthz,readyz,metrics", outgoing: bool = False) -> None:
    """Server spans for ``app``'s Flask routes (opentelemetry-instrumentation-flask), and
    with ``outgoing`` client spans for the process's ``requests`` calls, when the
    variables turn tracing on. Called while the app is built, which may be before
    ``setup``: the instrumentation's tracer follows the provider set later."""
    if not TracingConfig.from_env(os.environ).enabled:
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor.instrument_app(app, excluded_urls=excluded)
    if outgoing:
        from opentelemetry.instrumentation.requests import RequestsInstrumentor

        RequestsInstrumentor().instrument()

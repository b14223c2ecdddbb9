"""The synchronous request path: HTTP request -> envelope -> message, reply -> HTTP response.

``ProxyRoute`` sits in front of the Flask app (``app.wsgi_app``, Flask's own middleware
hook) and serves every ``/<service>/...`` request itself; the reserved names go on to
Flask's views. The proxy route is the one every request takes, so it reads the WSGI
environment directly instead of building Flask's request context, routing and
response objects, which cost more than the rest of the gateway's work on a request.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass

from gateway import controls, errors, idempotency, incoming, jobs, metrics
from gateway.answers import Answer, error_answer, reply_answer
from gateway.broker import BrokerLink
from gateway.outgoing import envelope_of, exchange
from gateway.streams import OPEN, Stream, StreamAnswer
from proxymq import tracing
from proxymq.config import RESERVED_NAMES, GatewayConfig, is_service_name
from proxymq.idempotency import IdempotencyStore
from proxymq.jobs import JobStore

log = logging.getLogger(__name__)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Gateway:
    """What a gateway process serves with: its configuration, broker link, job store."""

    config: GatewayConfig
    link: BrokerLink
    store: JobStore | None
    idempotency: IdempotencyStore | None = None


class ProxyRoute:
    """WSGI middleware: ``/<service>/...`` here, everything else to ``flask_app``."""

    def __init__(self, flask_app, gateway: Gateway) -> None:
        self._flask_app = flask_app
        self._gateway = gateway

    def __call__(self, environ, start_response):
        path, query = incoming.raw_target(environ)
        service, rest = incoming.split_service(path)
        if not service or service in RESERVED_NAMES:
            return self._flask_app(environ, start_response)
        return handle(self._gateway, environ, service, rest, query)(environ, start_response)


def handle(
    gateway: Gateway, environ: dict, service: str, path: str, query: str | None
) -> Answer | StreamAnswer:
    """One request through the queue and back; every failure is the gateway's answer."""
    started = time.perf_counter()
    correlation_id = str(uuid.uuid4())
    method = environ.get("REQUEST_METHOD", "")
    config, link = gateway.config, gateway.link
    link.start()  # after gunicorn's fork: this process's own connection and reply queue
    code: str | None = None
    span = None
    if tracing.ENABLED:
        from gateway.tracing import RequestSpan

        span = RequestSpan(environ, service, path, method, correlation_id)
    try:
        check_service(service, config)
        incoming.check_path(path)
        if method not in METHODS:
            raise errors.GatewayError(405, "method-not-allowed", f"{method!r} is not served")
        headers = incoming.headers_of(environ)
        incoming.check_header_size(headers, config)
        request = incoming.ClientRequest(environ, service, method, path, query, headers)
        key = controls.idempotency_key(headers)
        priority = controls.priority(headers, config.max_client_priority)
        if incoming.wants_async(headers):
            answer = jobs.submit(gateway, request, correlation_id, key)
        else:
            answer, code = synchronous(gateway, request, correlation_id, key, started)
        if priority is not None:
            label = metrics.label(service, config, link.known_queues)
            metrics.requests_by_priority_total.labels(label, str(priority)).inc()
    except errors.GatewayError as error:
        answer, code = error_answer(error, correlation_id), error.code
    except Exception:
        log.exception("unexpected error on a request for %r", service)
        error = errors.GatewayError(500, "internal-error", "the gateway failed; see its log")
        answer, code = error_answer(error, correlation_id), error.code
    label = metrics.label(service, config, link.known_queues)  # its queue may be known now
    metrics.count(label, answer.status, code, started)
    if span is not None:
        span.end(answer.status, code)
    return answer


def synchronous(
    gateway: Gateway,
    request: incoming.ClientRequest,
    correlation_id: str,
    key: str | None,
    started: float,
) -> tuple[Answer | StreamAnswer, str | None]:
    """Publish and wait for the reply; with an ``Idempotency-Key``, only as its first
    request (a repeat is replayed, ``gateway.idempotency``)."""
    config, link = gateway.config, gateway.link
    wait = incoming.wait_seconds(request.headers, config)
    envelope = envelope_of(request, wait, config)
    label = functools.partial(metrics.label, request.service, config, link.known_queues)
    once = None
    if key is not None:
        once = idempotency.Once(gateway, envelope, key, request.headers, correlation_id, label)
        record = once.begin(wait)
        if record is not None:
            return once.replayed(jobs.replay(gateway, record, request)), None
    try:
        with metrics.inflight.labels(label()).track_inprogress():
            reply, stream = exchange(link, envelope, correlation_id, wait)
    except BaseException as error:
        if once is not None:
            once.fail(error, link.replies)
        raise
    if stream is None:
        if once is not None:
            once.keep_reply(reply)
        return reply_answer(reply, correlation_id, request.method), reply.error
    metrics.stream_first_byte.labels(label()).observe(time.perf_counter() - started)
    if once is not None:
        once.keep_alive(lambda: stream.state == OPEN)

    def end(stream: Stream) -> None:
        try:
            link.end_stream(correlation_id, stream)
        finally:
            if once is not None:  # a stream is not kept: its key is free once it ends
                once.release()

    idle = config.stream_idle_timeout
    return StreamAnswer(reply, stream, correlation_id, idle, end), None


def check_service(service: str, config: GatewayConfig) -> None:
    """Refuse names that cannot be services before anything touches the broker."""
    if not is_service_name(service) or (
        config.services is not None and service not in config.services
    ):
        raise errors.unknown_service(service)

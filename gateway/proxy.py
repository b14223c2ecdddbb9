"""The proxy route and the synchronous request path: HTTP request -> envelope -> message,
reply -> HTTP response.

``ProxyRoute`` sits in front of the Flask app (``app.wsgi_app``, Flask's own middleware
hook) and serves every ``/<service>/...`` request itself; the reserved names go on to
Flask's views. The proxy route is the one every request takes, so it reads the WSGI
environment directly (``gateway.request``) instead of building Flask's request context,
routing and response objects, which cost more than the rest of the gateway's work on a
request.
"""

from __future__ import annotations

import logging
import time

from gateway import errors, idempotency, jobs, metrics
from gateway.answers import Answer, error_answer, replay_answer, reply_answer
from gateway.outgoing import exchange
from gateway.process import Gateway
from gateway.request import ProxyRequest, raw_target, split_service
from gateway.streams import Stream, StreamAnswer
from proxymq import tracing
from proxymq.envelope import RequestEnvelope
from proxymq.parsers import RESERVED_NAMES

log = logging.getLogger(__name__)


class ProxyRoute:
    """WSGI middleware: ``/<service>/...`` here, everything else to ``flask_app``."""

    def __init__(self, flask_app, gateway: Gateway) -> None:
        self._flask_app = flask_app
        self._gateway = gateway

    def __call__(self, environ, start_response):
        path, query = raw_target(environ)
        service, rest = split_service(path)
        if not service or service in RESERVED_NAMES:
            return self._flask_app(environ, start_response)
        return handle(self._gateway, environ, service, rest, query)(environ, start_response)


def handle(
    gateway: Gateway, environ: dict, service: str, path: str, query: str | None
) -> Answer | StreamAnswer:
    """One request through the queue and back; every failure is the gateway's answer."""
    request = ProxyRequest.begin(gateway, environ, service, path, query)
    gateway.link.start()  # after gunicorn's fork: this process's own connection and reply queue
    code: str | None = None
    span = None
    if tracing.ENABLED:
        from gateway.tracing import RequestSpan

        span = RequestSpan(environ, service, path, request.method, request.correlation_id)
    try:
        request.read(jobs_served=gateway.store is not None)
        # A refusal before the body is read and anything is published (shedding a call
        # whose service cannot answer within ``request.wait``, say) goes here, raising
        # its catalogue error; ``request.asynchronous`` tells a job from a call.
        envelope = request.envelope()
        if request.asynchronous:
            answer = jobs.submit(gateway, request, envelope)
        else:
            answer, code = synchronous(gateway, request, envelope)
        if request.priority is not None:
            metrics.requests_by_priority_total.labels(request.label, str(request.priority)).inc()
    except errors.GatewayError as error:
        answer, code = error_answer(error, request.correlation_id), error.code
    except Exception:
        log.exception("unexpected error on a request for %r", service)
        error = errors.INTERNAL_ERROR("the gateway failed; see its log")
        answer, code = error_answer(error, request.correlation_id), error.code
    metrics.count(request.label, answer.status, code, request.started)
    if span is not None:
        span.end(answer.status, code)
    return answer


def synchronous(
    gateway: Gateway, request: ProxyRequest, envelope: RequestEnvelope
) -> tuple[Answer | StreamAnswer, str | None]:
    """Publish and wait for the reply; with an ``Idempotency-Key``, only as its first
    request (a repeat is replayed, ``gateway.idempotency``). Refused at once, from the
    service's announced state, when it cannot be served in time; a repeat's kept answer
    needs no service, so a keyed request is refused only once it is known to be a first."""
    link = gateway.link
    with idempotency.Once(gateway, envelope, request) as once:
        if once.record is None:
            # Its service's announced state (breaker, pause, backlog) may refuse it at
            # once; a repeat is replayed all the same, and a refused first lets its key go.
            refusal = link.status.refusal(request.service, request.wait, bool(request.priority))
            if refusal is not None:
                raise refusal
            with metrics.inflight.labels(request.label).track_inprogress():
                once.outcome = exchange(link, envelope, request.correlation_id, request.wait)
    if once.record is not None:
        return replay_answer(once.record, request.method, once.anonymous), None
    reply, stream = once.outcome
    if stream is None:
        return reply_answer(reply, request.correlation_id, request.method), reply.error
    metrics.stream_first_byte.labels(request.label).observe(time.perf_counter() - request.started)
    correlation_id = request.correlation_id

    def end(stream: Stream) -> None:
        try:
            link.end_stream(correlation_id, stream)
        finally:
            once.release()  # a stream is not kept: its key is free once it ends

    idle = gateway.config.stream_idle_timeout
    return StreamAnswer(reply, stream, correlation_id, idle, end), None

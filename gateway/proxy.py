"""The synchronous request path: HTTP request -> envelope -> message, reply -> HTTP response."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import gevent
from flask import Request, Response

from gateway import errors
from gateway.broker import NACK, RETURNED, BrokerLink, BrokerUnavailable
from proxymq.config import GatewayConfig, is_service_name, queue_name
from proxymq.envelope import ReplyEnvelope, RequestEnvelope, decode_reply, task_message
from proxymq.headers import end_to_end

TIMEOUT_HEADER = "X-ProxyMQ-Timeout"


class PassthroughResponse(Response):
    """A response that adds no Content-Type of its own: the downstream's headers are final."""

    default_mimetype = None


def check_service(service: str, config: GatewayConfig) -> None:
    """Refuse names that cannot be services before anything touches the broker."""
    if not is_service_name(service) or (
        config.services is not None and service not in config.services
    ):
        raise errors.unknown_service(service)


def check_header_size(request: Request, config: GatewayConfig) -> None:
    size = sum(len(name) + len(value) + 4 for name, value in request.headers.items())
    if size > config.max_header_bytes:
        raise errors.GatewayError(
            431,
            "headers-too-large",
            f"request headers are {size} bytes, over the limit of {config.max_header_bytes}",
        )


def wait_seconds(request: Request, config: GatewayConfig) -> float:
    """How long this request waits: the configured maximum, or less if the client asks."""
    asked = request.headers.get(TIMEOUT_HEADER)
    if asked is None:
        return config.reply_timeout
    try:
        seconds = float(asked)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise errors.bad_request(f"{TIMEOUT_HEADER} must be a positive number of seconds")
    return min(seconds, config.reply_timeout)


def raw_target(request: Request) -> tuple[str, str]:
    """The downstream path and query exactly as the client sent them.

    Werkzeug decodes the path, which would turn ``a%2Fb`` into ``a/b``; gunicorn keeps the
    raw request target in ``RAW_URI``. The first segment (the service) is cut off, and
    bytes outside ASCII are percent-encoded, since an HTTP request line cannot carry them.
    """
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if not raw:
        return request.script_root + request.path, request.query_string.decode("latin-1")
    if not raw.startswith("/"):
        parts = urlsplit(raw)
        raw = parts.path + ("?" + parts.query if parts.query else "")
    path, _, query = raw.partition("?")
    cut = path.find("/", 1)
    path = path[cut:] if cut > 0 else "/"
    return path, query


def read_body(request: Request, config: GatewayConfig) -> bytes:
    length = request.content_length
    if length is not None and length > config.max_body_bytes:
        raise _body_too_large(config)
    body = request.stream.read(config.max_body_bytes + 1)
    if len(body) > config.max_body_bytes:
        raise _body_too_large(config)
    return body


def _body_too_large(config: GatewayConfig) -> errors.GatewayError:
    return errors.GatewayError(
        413, "body-too-large", f"request body over the limit of {config.max_body_bytes} bytes"
    )


# Headers addressed to the gateway itself, never forwarded.
OWN_HEADERS = ("host", "x-proxymq-timeout", "x-proxymq-callback")


def build_request(
    service: str,
    request: Request,
    config: GatewayConfig,
    wait: float,
    job: bool = False,
    callback: str | None = None,
) -> RequestEnvelope:
    path, query = raw_target(request)
    headers = end_to_end(request.headers.items(), also_drop=OWN_HEADERS)
    return RequestEnvelope(
        service=service,
        method=request.method,
        path=path,
        query=query,
        headers=headers,
        body=read_body(request, config),
        deadline=int((time.time() + wait) * 1000),
        job=job,
        callback=callback,
    )


def forward(
    link: BrokerLink, envelope: RequestEnvelope, correlation_id: str, wait: float
) -> ReplyEnvelope:
    """Publish the request and wait for its reply, at most ``wait`` seconds in all."""
    give_up = time.monotonic() + wait
    waiter = link.replies.expect(correlation_id)
    try:
        publish(link, envelope, correlation_id, wait, reply=True)
        data = waiter.get(timeout=max(0.0, give_up - time.monotonic()))
    except gevent.Timeout:
        raise errors.timeout(wait) from None
    except BrokerUnavailable as exc:
        raise errors.broker_unavailable(str(exc)) from None
    finally:
        link.replies.forget(correlation_id)
    return decode_reply(data)


def publish(
    link: BrokerLink, envelope: RequestEnvelope, correlation_id: str, wait: float, reply: bool
) -> None:
    """Publish the request's message; an unroutable or refused one is the gateway's error.

    Raises ``BrokerUnavailable`` and ``gevent.Timeout`` (no confirm in time) for the
    caller to name, since a synchronous request and a job name them differently.
    """
    body, headers, properties = task_message(envelope, correlation_id, reply_to=None)
    queue = queue_name(envelope.service)
    outcome = link.publish(queue, body, headers, properties, wait, reply=reply)
    if outcome == RETURNED:
        raise errors.unknown_service(envelope.service)
    if outcome == NACK:
        raise errors.queue_full(envelope.service)


def reply_response(reply: ReplyEnvelope, correlation_id: str) -> Response:
    if reply.error:
        error = errors.GatewayError(reply.status, reply.error, reply.message)
        return errors.error_response(error, correlation_id)
    response = PassthroughResponse(reply.body, status=reply.status, headers=reply.headers)
    # Werkzeug sets Content-Length from the body; a HEAD answer's own length must stay.
    for name, value in reply.headers:
        if name.lower() == "content-length":
            response.headers["Content-Length"] = value
    response.headers["X-Correlation-ID"] = correlation_id
    return response

"""One downstream call: a delivery's request out over HTTP, the answer back as a reply.

Single mode sends each request to the service's plain URL here; batch mode
(``workers.batch_call``) sends many in one call. Both share the headers every call
carries and the rule that a call cut off by the request's deadline is a 504 ``timeout``
(the gateway gives up at that moment too), never a 502.

The deadline bounds the whole call, not each read: its socket is registered with
``proxymq.outbound.DEADLINES`` and shut at the deadline (or ``downstream_timeout``), so a
downstream trickling its head or body a byte at a time is cut off there. That is what
lets the gateway hold an idempotency key only until the worker's reply: after the
deadline, nobody is still calling for it. A streamed answer is bounded up to its head;
its body has its own bounds (``workers.streaming``).
"""

from __future__ import annotations

import http.client
import logging
import select
import socket
import threading
import time
from urllib.parse import SplitResult, urlsplit

import requests
import urllib3

from proxymq import tracing
from proxymq.config import ServiceConfig
from proxymq.envelope import ReplyEnvelope
from proxymq.headers import end_to_end
from proxymq.outbound import DEADLINES, BoundedAdapter
from workers.delivery import Delivery
from workers.observers import observe
from workers.streaming import Streaming, streams

log = logging.getLogger(__name__)

# Headers ProxyMQ sets on every downstream call; a client's own copies are replaced.
OWN_HEADERS = (
    "x-correlation-id",
    "x-proxymq-delivery-count",
    "x-proxymq-deadline",
    "x-proxymq-replayed",
    "x-proxymq-attempt",
)
TIMEOUTS = (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout)
FAILURES = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


def session(pool_size: int) -> requests.Session:
    """A pooled session for batch calls, adding nothing of its own to the request.

    ``trust_env`` is off: proxy variables and ``.netrc`` are not the client's, and looking
    them up costs time on every call. The session's default headers (User-Agent,
    Accept-Encoding) are dropped so the downstream sees what the client sent.
    """
    http = requests.Session()
    http.trust_env = False
    http.headers.clear()
    adapter = BoundedAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    return http


def downstream_headers(delivery: Delivery) -> list[tuple[str, str]]:
    request = delivery.request
    headers = [(n, v) for n, v in request.headers if n.lower() not in OWN_HEADERS]
    headers += [
        ("X-Correlation-ID", delivery.correlation_id),
        ("X-ProxyMQ-Delivery-Count", str(delivery.count)),
        ("X-ProxyMQ-Deadline", str(request.deadline)),
    ]
    if delivery.replayed is not None:  # an operator replayed it from the dead letters
        headers.append(("X-ProxyMQ-Replayed", str(delivery.replayed)))
    if delivery.service.retries:  # which attempt this is (workers.flow.retry)
        headers.append(("X-ProxyMQ-Attempt", str(delivery.attempt)))
    if tracing.ENABLED:  # the client's trace context is replaced by the worker's own
        from workers.tracing import propagation

        headers = [(n, v) for n, v in headers if n.lower() not in tracing.PROPAGATED]
        headers += observe(propagation, delivery) or []
    return headers


def unavailable(message: str) -> ReplyEnvelope:
    return ReplyEnvelope(status=502, error="downstream-unavailable", message=message)


def timed_out() -> ReplyEnvelope:
    return ReplyEnvelope(
        status=504, error="timeout", message="the request's deadline passed before its answer"
    )


def too_large(limit: int) -> ReplyEnvelope:
    """The reply for an answer over ``PROXYMQ_MAX_RESPONSE_BYTES``: final, like any other
    reply, so the downstream is called once, not again on every redelivery (and a reply
    the broker would refuse as too big is never built)."""
    return ReplyEnvelope(
        status=502,
        error="response-too-large",
        message=f"the downstream's answer is over the limit of {limit} bytes",
    )


def budget(service: ServiceConfig, deadline_ms: int) -> tuple[float, bool]:
    """Seconds the call may take, and whether the deadline (not the service's own
    ``downstream_timeout``) is what bounds it."""
    left = deadline_ms / 1000 - time.time()
    return min(service.downstream_timeout, left), left <= service.downstream_timeout


def cut_off(deadline_bound: bool, what: str) -> ReplyEnvelope:
    """The reply for a call whose socket was shut at its time limit, whatever it raised
    (or returned: an answer read to its connection's close comes back short)."""
    return failure(TimeoutError("cut off at its time limit"), deadline_bound, what)


def failure(exc: BaseException, deadline_bound: bool, what: str) -> ReplyEnvelope:
    """The reply for a call that raised: 504 when the deadline cut it off, else 502.

    The message names the failure only; where the call went (host, port, path, query)
    is for the worker's log, not for the client.
    """
    log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
    if deadline_bound and isinstance(exc, TIMEOUTS):
        return timed_out()
    if isinstance(exc, TIMEOUTS):
        return unavailable("the downstream did not answer in time")
    return unavailable(f"the downstream could not be reached ({type(exc).__name__})")


class Connections:
    """Keep-alive connections to downstreams: one per call thread and host, so no lock.

    Single calls go out through the standard library's ``http.client`` (what urllib3
    and requests are built on) rather than through requests: urllib3 re-encodes every
    request target (``%2e`` becomes ``%2E``, and one invalid escape makes it encode
    every ``%`` again), while the client's path and query must reach the downstream
    byte for byte. It also costs a third of what a call through requests costs.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, base: SplitResult, timeout: float) -> http.client.HTTPConnection:
        pool = self._local.__dict__.setdefault("connections", {})
        key = (base.scheme, base.netloc)
        connection = pool.get(key)
        if connection is not None and _dropped(connection):
            connection.close()
            connection = None
        if connection is None:
            kind = (
                http.client.HTTPSConnection
                if base.scheme == "https"
                else http.client.HTTPConnection
            )
            connection = pool[key] = kind(base.hostname, base.port, timeout=timeout)
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        return connection

    def detach(self, base: SplitResult) -> None:
        """Forget the connection without closing it: a stream's relay owns it now."""
        self._local.__dict__.get("connections", {}).pop((base.scheme, base.netloc), None)

    def discard(self, base: SplitResult) -> None:
        pool = self._local.__dict__.get("connections", {})
        connection = pool.pop((base.scheme, base.netloc), None)
        if connection is not None:
            connection.close()


def _too_large(
    connections: Connections, base: SplitResult, delivery: Delivery, limit: int
) -> ReplyEnvelope:
    """The answer is left unread: its connection cannot serve another call."""
    connections.discard(base)
    log.warning(
        "call %s to %s: answer over %d bytes", delivery.correlation_id, delivery.service.name, limit
    )
    return too_large(limit)


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection the downstream closed reads as ready (EOF)."""
    sock = connection.sock
    if sock is None:
        return False
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def call(
    connections: Connections, delivery: Delivery, limit: int, stream: bool = False
) -> ReplyEnvelope | Streaming:
    """Call the downstream once; never raises for a downstream failure.

    The target is the downstream URL's path plus the client's path and query, exactly
    as sent. The body is read raw (not decompressed), so it reaches the client byte for
    byte, as do the headers, in order and repeated. An answer over ``limit`` bytes is
    not read further: its connection is dropped and the reply is 502. With ``stream``,
    an answer that streams (``workers.streaming``) comes back unread, as ``Streaming``.
    The whole call, connect to last byte (a stream: to its head), ends by the deadline
    or ``downstream_timeout``: its socket is shut then, and the reply is ``cut_off``.
    """
    service, request = delivery.service, delivery.request
    base = urlsplit(service.downstream_url)
    target = base.path.rstrip("/") + request.path
    if request.query is not None:
        target += "?" + request.query
    seconds, deadline_bound = budget(service, request.deadline)
    if seconds <= 0:
        return timed_out()
    when = time.monotonic() + seconds
    what = f"call {delivery.correlation_id} to {service.name}"
    deadline = None
    try:
        connection = connections.get(base, seconds)  # connects within ``seconds``
        if connection.sock is None:
            connection.connect()
        deadline = DEADLINES.add(when, connection.sock)
        result = _exchange(connections, connection, base, target, delivery, limit, stream)
    except (http.client.HTTPException, OSError) as exc:
        connections.discard(base)
        if deadline is not None and not DEADLINES.cancel(deadline):
            return cut_off(deadline_bound, what)
        return failure(exc, deadline_bound, what)
    if not DEADLINES.cancel(deadline):  # shut after all, or read short to its close
        connections.discard(base)
        if isinstance(result, Streaming):
            result.close()
        return cut_off(deadline_bound, what)
    return result


def _exchange(
    connections: Connections,
    connection: http.client.HTTPConnection,
    base: SplitResult,
    target: str,
    delivery: Delivery,
    limit: int,
    stream: bool,
) -> ReplyEnvelope | Streaming:
    """Send the request and read its answer (the head only, for one that streams)."""
    request = delivery.request
    connection.putrequest(request.method, target, skip_accept_encoding=True)
    for name, value in downstream_headers(delivery):
        if name.lower() != "content-length":  # the body's own length, set below
            connection.putheader(name, value)
    if request.body or request.method in ("POST", "PUT", "PATCH"):
        connection.putheader("Content-Length", str(len(request.body)))
    connection.endheaders(request.body or None)
    sock = connection.sock
    response = connection.getresponse()
    if stream and request.method != "HEAD" and streams(response):
        connections.detach(base)
        head = ReplyEnvelope(status=response.status, headers=end_to_end(response.getheaders()))
        return Streaming(head, response, sock)
    # ``length`` is the declared Content-Length (None when chunked, 0 for HEAD).
    declared = response.length
    if declared is not None and declared > limit:
        return _too_large(connections, base, delivery, limit)
    body = response.read(limit + 1)
    if declared is not None and len(body) < declared:
        # read(n) returns what came before the downstream hung up, without a word.
        raise http.client.IncompleteRead(body, declared - len(body))
    if len(body) > limit:
        return _too_large(connections, base, delivery, limit)
    headers = end_to_end(response.getheaders())
    if response.will_close:
        connections.discard(base)
    return ReplyEnvelope(status=response.status, headers=headers, body=body)

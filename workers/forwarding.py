"""One downstream call: a delivery's request out over HTTP, the answer back as a reply.

Single mode sends each request to the service's plain URL here; batch mode
(``workers.batch_call``) sends many in one call. Both share the headers every call
carries and the rule that a call cut off by the request's deadline is a 504 ``timeout``
(the gateway gives up at that moment too), never a 502.
"""

from __future__ import annotations

import logging
import socket
import time

import requests
import urllib3
from requests.adapters import HTTPAdapter

from proxymq.config import ServiceConfig
from proxymq.envelope import ReplyEnvelope
from proxymq.headers import end_to_end
from workers.delivery import Delivery

log = logging.getLogger(__name__)

# Headers ProxyMQ sets on every downstream call; a client's own copies are replaced.
OWN_HEADERS = ("x-correlation-id", "x-proxymq-delivery-count", "x-proxymq-deadline")
TIMEOUTS = (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout)
FAILURES = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


def session(pool_size: int) -> requests.Session:
    """A pooled session that adds nothing to the client's request.

    ``trust_env`` is off: proxy variables and ``.netrc`` are not the client's, and looking
    them up costs time on every call. The session's default headers (User-Agent,
    Accept-Encoding) are dropped so the downstream sees what the client sent.
    """
    http = requests.Session()
    http.trust_env = False
    http.headers.clear()
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
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
    return headers


def unavailable(message: str) -> ReplyEnvelope:
    return ReplyEnvelope(status=502, error="downstream-unavailable", message=message)


def timed_out() -> ReplyEnvelope:
    return ReplyEnvelope(
        status=504, error="timeout", message="the request's deadline passed before its answer"
    )


def budget(service: ServiceConfig, deadline_ms: int) -> tuple[float, bool]:
    """Seconds the call may take, and whether the deadline (not the service's own
    ``downstream_timeout``) is what bounds it."""
    left = deadline_ms / 1000 - time.time()
    return min(service.downstream_timeout, left), left <= service.downstream_timeout


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


def call(http: requests.Session, delivery: Delivery) -> ReplyEnvelope:
    """Call the downstream once; never raises for a downstream failure.

    The URL is set on the prepared request as is: requests would otherwise re-quote it
    and change the client's percent-encoding. The body is read raw (not decompressed),
    so it reaches the client byte for byte, as do the headers, in order and repeated.
    """
    service, request = delivery.service, delivery.request
    url = service.downstream_url.rstrip("/") + request.path
    if request.query:
        url += "?" + request.query
    seconds, deadline_bound = budget(service, request.deadline)
    if seconds <= 0:
        return timed_out()
    headers = dict(downstream_headers(delivery))
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare(method=request.method, url=url, headers=headers, data=request.body)
        prepared.url = url
        response = http.send(prepared, timeout=seconds, allow_redirects=False, stream=True)
        try:
            body = response.raw.read(decode_content=False)
            raw_headers = _raw_headers(response)
        finally:
            response.close()
    except FAILURES as exc:
        # urllib3's own errors escape requests when the body is read raw (a connection
        # closed or stalled mid-body).
        return failure(exc, deadline_bound, f"call {delivery.correlation_id} to {service.name}")
    return ReplyEnvelope(status=response.status_code, headers=end_to_end(raw_headers), body=body)


def _raw_headers(response: requests.Response) -> list[tuple[str, str]]:
    """The response headers as sent: requests merges repeated ones into one comma list."""
    original = getattr(response.raw, "_original_response", None)
    if original is not None:
        return list(original.getheaders())
    return list(response.raw.headers.items())

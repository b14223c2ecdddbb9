"""Envelope -> HTTP call to the downstream -> reply envelope."""

from __future__ import annotations

import time

import requests
import urllib3
from requests.adapters import HTTPAdapter

from proxymq.config import ServiceConfig
from proxymq.envelope import ReplyEnvelope, RequestEnvelope
from proxymq.headers import end_to_end

# Headers ProxyMQ sets on every downstream call; a client's own copies are replaced.
OWN_HEADERS = ("x-correlation-id", "x-proxymq-delivery-count", "x-proxymq-deadline")


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


def downstream_headers(
    request: RequestEnvelope, correlation_id: str, delivery_count: int
) -> list[tuple[str, str]]:
    headers = [(n, v) for n, v in request.headers if n.lower() not in OWN_HEADERS]
    headers += [
        ("X-Correlation-ID", correlation_id),
        ("X-ProxyMQ-Delivery-Count", str(delivery_count)),
        ("X-ProxyMQ-Deadline", str(request.deadline)),
    ]
    return headers


def unavailable(message: str) -> ReplyEnvelope:
    return ReplyEnvelope(status=502, error="downstream-unavailable", message=message)


def call(
    http: requests.Session,
    service: ServiceConfig,
    request: RequestEnvelope,
    correlation_id: str,
    delivery_count: int,
) -> ReplyEnvelope:
    """Call the downstream once; never raises for a downstream failure.

    The URL is set on the prepared request as is: requests would otherwise re-quote it
    and change the client's percent-encoding. The body is read raw (not decompressed),
    so it reaches the client byte for byte, as do the headers, in order and repeated.
    """
    url = service.downstream_url.rstrip("/") + request.path
    if request.query:
        url += "?" + request.query
    budget = min(service.downstream_timeout, request.deadline / 1000 - time.time())
    if budget <= 0:
        return unavailable("the request's deadline passed before the call")
    headers = dict(downstream_headers(request, correlation_id, delivery_count))
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare(method=request.method, url=url, headers=headers, data=request.body)
        prepared.url = url
        response = http.send(prepared, timeout=budget, allow_redirects=False, stream=True)
        try:
            body = response.raw.read(decode_content=False)
            headers = _raw_headers(response)
        finally:
            response.close()
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        # urllib3's own errors escape requests when the body is read raw (a connection
        # closed or stalled mid-body).
        return unavailable(f"{type(exc).__name__}: {exc}")
    return ReplyEnvelope(status=response.status_code, headers=end_to_end(headers), body=body)


def _raw_headers(response: requests.Response) -> list[tuple[str, str]]:
    """The response headers as sent: requests merges repeated ones into one comma list."""
    original = getattr(response.raw, "_original_response", None)
    if original is not None:
        return list(original.getheaders())
    return list(response.raw.headers.items())

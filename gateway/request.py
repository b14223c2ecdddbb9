"""One proxied request, read once from the WSGI environment: ``ProxyRequest``.

The proxy route builds it for every ``/<service>/...`` request, and ``read`` parses
everything the gateway takes from the client's head in one pass, in the order its
refusals are answered (unknown service, path, method, header size, then the client's
controls: ``Idempotency-Key``, ``X-ProxyMQ-Priority``, ``Prefer``, ``X-ProxyMQ-Callback``,
``X-ProxyMQ-Timeout``). Nothing downstream of it reads a header again: the synchronous
call, jobs and idempotency take the request (docs/client-controls.md for the controls).

Read straight from the environment (no Flask request object on the proxy route): the
raw request target, the headers, and the body within its limit, read when the message
is built (``envelope``), after every check of the head.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import gevent

from gateway import errors, metrics
from proxymq.config import GatewayConfig, is_service_name
from proxymq.envelope import RequestEnvelope
from proxymq.headers import Headers, end_to_end

if TYPE_CHECKING:
    from gateway.process import Gateway

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TIMEOUT_HEADER = "X-ProxyMQ-Timeout"
CALLBACK_HEADER = "X-ProxyMQ-Callback"
PRIORITY_HEADER = "X-ProxyMQ-Priority"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# AMQP's priority is an octet; RabbitMQ treats one above the queue's x-max-priority as
# that maximum, and ignores priorities on a queue without one.
MAX_PRIORITY = 255
_DIGITS = re.compile(r"[0-9]{1,3}")
_WAIT = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")
# The IETF draft's key is a Structured Field String: printable ASCII. 255 is plenty.
_KEY = re.compile(r'"?([\x20-\x7e]{1,255}?)"?')
# Request headers named X-ProxyMQ-* are addressed to the gateway; Host and the
# X-Forwarded-* the gateway sets itself are replaced, not passed on.
_OWN_PREFIX = "x-proxymq-"
_REPLACED = ("host", "x-forwarded-proto", "x-forwarded-host")
_ENVIRON_HEADERS = {"CONTENT_TYPE": "Content-Type", "CONTENT_LENGTH": "Content-Length"}


@dataclass(slots=True)
class ProxyRequest:
    """What the gateway knows of one request, before its body; built once per call.

    ``wait`` is how long a synchronous call waits for its reply (``X-ProxyMQ-Timeout``
    within ``PROXYMQ_REPLY_TIMEOUT``); a job's message has ``PROXYMQ_JOB_TIMEOUT``
    instead, and ``preferred_wait`` is how long its 202 may wait for the answer.
    """

    environ: dict
    service: str
    path: str  # after the service's segment, raw
    query: str | None  # raw; None without a "?"
    correlation_id: str
    started: float  # time.perf_counter() when the gateway took the request
    config: GatewayConfig
    known_queues: set[str]  # the link's, live: a publish may make the service known
    method: str = ""
    headers: Headers = ()
    asynchronous: bool = False
    wait: float = 0.0
    preferred_wait: float | None = None
    priority: int | None = None
    idempotency_key: str | None = None
    credential: str | None = None  # PROXYMQ_JOB_AUTH_HEADER's value: whose job, whose key
    cookie: str | None = None  # with the credential, whose key (proxymq.idempotency.scope)
    callback: str | None = None
    _label: str = metrics.UNKNOWN_SERVICE

    @classmethod
    def begin(
        cls, gateway: Gateway, environ: dict, service: str, path: str, query: str | None
    ) -> ProxyRequest:
        """The request as it arrives, not yet checked (``read``); its correlation id and
        start time are its own from here on."""
        return cls(
            environ,
            service,
            path,
            query,
            str(uuid.uuid4()),
            time.perf_counter(),
            gateway.config,
            gateway.link.known_queues,
            environ.get("REQUEST_METHOD", ""),
        )

    def read(self, jobs_served: bool) -> None:
        """Check the head and parse the client's controls; the gateway's error (400,
        404, 405, 431, 501) for the first thing wrong. ``jobs_served``: this gateway has
        a result store (``Prefer: respond-async`` is 501 without one)."""
        config = self.config
        if not is_service_name(self.service) or (
            config.services is not None and self.service not in config.services
        ):
            raise errors.unknown_service(self.service)
        check_path(self.path)
        if self.method not in METHODS:
            raise errors.METHOD_NOT_ALLOWED(f"{self.method!r} is not served")
        self.headers = headers = headers_of(self.environ)
        check_header_size(headers, config.max_header_bytes)
        self.idempotency_key = idempotency_key(headers)
        self.priority = priority(headers, config.max_client_priority)
        self.credential = header(headers, config.job_auth_header)
        self.cookie = header(headers, "Cookie")
        self.asynchronous = wants_async(headers)
        if self.asynchronous:
            if not jobs_served:
                raise errors.ASYNC_UNAVAILABLE(
                    "asynchronous jobs need PROXYMQ_RESULT_URL on the gateway"
                )
            self.callback = callback_url(headers)
            self.preferred_wait = preferred_wait(headers, config.reply_timeout)
            self.wait = config.job_timeout
        else:
            self.wait = wait_seconds(headers, config.reply_timeout)

    @property
    def label(self) -> str:
        """The service as a metric label (``metrics.label``), once it is known to be real;
        asked again until then, since the request's own publish may confirm its queue."""
        if self._label == metrics.UNKNOWN_SERVICE:
            self._label = metrics.label(self.service, self.config, self.known_queues)
        return self._label

    def envelope(self) -> RequestEnvelope:
        """The request as the downstream should see it: reads the body (413, 408, 400);
        its deadline is ``wait`` from when the body has arrived."""
        config = self.config
        return RequestEnvelope(
            service=self.service,
            method=self.method,
            path=self.path,
            query=self.query,
            body=read_body(self.environ, config.max_body_bytes, config.body_timeout),
            headers=forwarded_headers(self.headers, self.environ),
            deadline=int((time.time() + self.wait) * 1000),
            job=self.asynchronous,
            callback=self.callback,
            priority=self.priority,
        )


def raw_target(environ: dict) -> tuple[str, str | None]:
    """The path and query exactly as the client sent them (gunicorn's ``RAW_URI``):
    WSGI's ``PATH_INFO`` is percent-decoded, which would make ``a%2Fb`` into ``a/b``.
    The query is None when there is no ``?``, and ``""`` for a bare ``?``."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not raw:
        return environ.get("PATH_INFO", "/"), environ.get("QUERY_STRING") or None
    if not raw.startswith("/"):
        raw = _origin_form(raw)
    path, sep, query = raw.partition("?")
    return path, query if sep else None


def _origin_form(raw: str) -> str:
    """``http://host/path?q`` -> ``/path?q``, the rest of it untouched (urlsplit would
    drop a ``#`` and what follows, and normalize the empty query away)."""
    _, sep, rest = raw.partition("://")
    if not sep:
        return "/" + raw
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    target = rest[cut:]
    return target if target.startswith("/") else "/" + target


def split_service(path: str) -> tuple[str, str]:
    """``/svc/rest`` -> ``("svc", "/rest")``: the service is the first segment as sent."""
    cut = path.find("/", 1)
    if cut < 0:
        return path[1:], "/"
    return path[1:cut], path[cut:]


def check_path(path: str) -> None:
    """400 for a path whose dot-segments would climb above the service's root.

    The path goes to the downstream as sent, but a downstream (or a proxy in front of
    it) that normalizes it must not be led outside the base URL it was given: so the
    check reads the path as the most lenient normalizer would, with every escape
    decoded (``%2e%2e``, ``..%2f``) and backslashes taken as slashes.
    """
    depth = 0
    for segment in unquote(path).replace("\\", "/").split("/"):
        if segment == "..":
            depth -= 1
            if depth < 0:
                raise errors.bad_request("the path climbs above the service's root")
        elif segment not in ("", "."):
            depth += 1


def headers_of(environ: dict) -> Headers:
    """The request headers, in the order the client sent them (gunicorn keeps it)."""
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
        elif key in _ENVIRON_HEADERS:
            headers.append((_ENVIRON_HEADERS[key], value))
    return headers


def header(headers: Headers, name: str) -> str | None:
    name = name.lower()
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def check_header_size(headers: Headers, limit: int) -> None:
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if size > limit:
        raise errors.HEADERS_TOO_LARGE(
            f"request headers are {size} bytes, over the limit of {limit}"
        )


def priority(headers: Headers, allowed: int | None) -> int | None:
    """``X-ProxyMQ-Priority: 0..255`` as the message priority, at most ``allowed``
    (``PROXYMQ_MAX_CLIENT_PRIORITY``); 400 for anything else.

    The gateway does not know who its clients are, so by default (``allowed`` None) the
    header is not even read: any client could otherwise put its requests before
    everyone's. Whoever sets the setting decides who may send the header (docs/security.md).
    """
    value = header(headers, PRIORITY_HEADER) if allowed is not None else None
    if value is None:
        return None
    value = value.strip()
    if not _DIGITS.fullmatch(value) or int(value) > MAX_PRIORITY:
        raise errors.bad_request(f"{PRIORITY_HEADER} must be an integer from 0 to {MAX_PRIORITY}")
    return min(int(value), allowed)


def idempotency_key(headers: Headers) -> str | None:
    """The ``Idempotency-Key`` (quotes of the draft's sf-string form dropped); 400 when
    it is empty, too long or not printable ASCII."""
    value = header(headers, IDEMPOTENCY_HEADER)
    if value is None:
        return None
    match = _KEY.fullmatch(value.strip())
    if match is None or not match.group(1).strip():
        raise errors.bad_request(
            f"{IDEMPOTENCY_HEADER} must be 1 to 255 printable ASCII characters"
        )
    return match.group(1)


def _preferences(headers: Headers) -> list[str]:
    """RFC 7240's preferences (``Prefer``, repeated or comma-separated), parameters on."""
    return ",".join(v for n, v in headers if n.lower() == "prefer").split(",")


def preferred_wait(headers: Headers, limit: float) -> float | None:
    """RFC 7240's ``wait=<seconds>`` preference, at most ``limit``; None when absent.

    A malformed value is ignored, as RFC 7240 asks of preferences a server cannot honour.
    """
    for preference in _preferences(headers):
        name, _, value = preference.split(";")[0].strip().partition("=")
        if name.strip().lower() == "wait":
            value = value.strip().strip('"')
            if _WAIT.fullmatch(value):
                return min(float(value), limit)
    return None


def wants_async(headers: Headers) -> bool:
    """RFC 7240: ``Prefer: respond-async`` (among other preferences, any case)."""
    return "respond-async" in {p.split(";")[0].strip().lower() for p in _preferences(headers)}


def callback_url(headers: Headers) -> str | None:
    url = header(headers, CALLBACK_HEADER)
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.bad_request(f"{CALLBACK_HEADER} must be an http or https URL")
    return url


def wait_seconds(headers: Headers, limit: float) -> float:
    """How long this request waits: ``limit`` (``PROXYMQ_REPLY_TIMEOUT``), or less if
    the client asks (``X-ProxyMQ-Timeout``)."""
    asked = header(headers, TIMEOUT_HEADER)
    if asked is None:
        return limit
    try:
        seconds = float(asked)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise errors.bad_request(f"{TIMEOUT_HEADER} must be a positive number of seconds")
    return min(seconds, limit)


def forwarded_headers(headers: Headers, environ: dict) -> Headers:
    """What the downstream sees: end-to-end headers without the gateway's own, and
    ``X-Forwarded-For`` (the client's address appended), ``-Proto`` and ``-Host``."""
    host = header(headers, "Host")
    kept = [
        (name, value)
        for name, value in end_to_end(headers, also_drop=_REPLACED)
        if not name.lower().startswith(_OWN_PREFIX)
    ]
    client = environ.get("REMOTE_ADDR") or ""
    chain = [v for n, v in kept if n.lower() == "x-forwarded-for"]
    kept = [(n, v) for n, v in kept if n.lower() != "x-forwarded-for"]
    if client:
        chain.append(client)
    if chain:
        kept.append(("X-Forwarded-For", ", ".join(chain)))
    kept.append(("X-Forwarded-Proto", environ.get("wsgi.url_scheme", "http")))
    if host:
        kept.append(("X-Forwarded-Host", host))
    return kept


def read_body(environ: dict, limit: int, timeout: float) -> bytes:
    """The whole body, or 413 past ``limit``; 400 when its framing is malformed; 408 when
    it has not all arrived after ``timeout`` seconds.

    The timeout is for the whole body, not per read: a client sending a byte now and
    then would pass any per-read timeout while holding the connection for ever. (The
    request head is bounded by gunicorn, which parses each one within ``keepalive``.)
    """
    length = environ.get("CONTENT_LENGTH")
    if length and length.isdigit() and int(length) > limit:
        raise errors.body_too_large(limit)
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    deadline = gevent.Timeout(timeout)
    deadline.start()
    try:
        body = stream.read(limit + 1)
    except gevent.Timeout as exc:
        if exc is not deadline:
            raise
        raise errors.body_timeout(timeout) from None
    except Exception as exc:  # gunicorn's parser errors: a malformed chunked body
        raise errors.bad_request(f"malformed request body ({type(exc).__name__})") from None
    finally:
        deadline.close()
    if len(body) > limit:
        raise errors.body_too_large(limit)
    return body

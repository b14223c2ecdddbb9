"""A client's request as the gateway reads it from the WSGI environment.

Read straight from the environment (no Flask request object on the proxy route): the
raw request target, the headers, the body within its limit, and what the client asks
of the gateway itself (``X-ProxyMQ-Timeout``, ``Prefer: respond-async``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

import gevent

from gateway import errors
from proxymq.config import GatewayConfig
from proxymq.headers import Headers, end_to_end

TIMEOUT_HEADER = "X-ProxyMQ-Timeout"
CALLBACK_HEADER = "X-ProxyMQ-Callback"
# Request headers named X-ProxyMQ-* are addressed to the gateway; Host and the
# X-Forwarded-* the gateway sets itself are replaced, not passed on.
_OWN_PREFIX = "x-proxymq-"
_REPLACED = ("host", "x-forwarded-proto", "x-forwarded-host")
_ENVIRON_HEADERS = {"CONTENT_TYPE": "Content-Type", "CONTENT_LENGTH": "Content-Length"}


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """What the proxy route read of one request, before its body."""

    environ: dict
    service: str
    method: str
    path: str  # after the service's segment, raw
    query: str | None  # raw; None without a "?"
    headers: Headers


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


def check_header_size(headers: Headers, config: GatewayConfig) -> None:
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if size > config.max_header_bytes:
        raise errors.GatewayError(
            431,
            "headers-too-large",
            f"request headers are {size} bytes, over the limit of {config.max_header_bytes}",
        )


def forwarded_headers(headers: Headers, environ: dict) -> Headers:
    """What the downstream sees: end-to-end headers without the gateway's own, and
    ``X-Forwarded-For`` (the client's address appended), ``-Proto`` and ``-Host``."""
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
    host = header(headers, "Host")
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


def wait_seconds(headers: Headers, config: GatewayConfig) -> float:
    """How long this request waits: the configured maximum, or less if the client asks."""
    asked = header(headers, TIMEOUT_HEADER)
    if asked is None:
        return config.reply_timeout
    try:
        seconds = float(asked)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise errors.bad_request(f"{TIMEOUT_HEADER} must be a positive number of seconds")
    return min(seconds, config.reply_timeout)


def wants_async(headers: Headers) -> bool:
    """RFC 7240: ``Prefer: respond-async`` (among other preferences, any case)."""
    preferences = ",".join(v for n, v in headers if n.lower() == "prefer").lower()
    return "respond-async" in {p.split(";")[0].strip() for p in preferences.split(",")}

"""Short error codes for failed fetches, and the exceptions that map to them.

A failed fetch is an answer, not a server error: the caller gets ``"error": "<code>"``
with a small, stable vocabulary it can branch on, instead of the text of whatever
exception requests, urllib3 or the socket layer raised.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator

import requests
import urllib3.exceptions

from proxymq.outbound import BlockedAddressError

BLOCKED = "blocked-address"
DNS = "dns-failure"
REFUSED = "connection-refused"
CONNECTION = "connection-failed"
TLS = "tls-error"
TIMEOUT = "timeout"
TOO_LARGE = "too-large"
TOO_MANY_REDIRECTS = "too-many-redirects"
BAD_REDIRECT = "bad-redirect"
INVALID_URL = "invalid-url"
PROTOCOL = "protocol-error"
FAILED = "fetch-failed"


class FetchFailure(Exception):
    """A failure the fetcher detects itself (limits, redirects), carrying its code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# Everything a fetch may raise that means "this URL could not be fetched" rather than
# "the fetcher has a bug": caught and answered with a code, the rest propagates.
FETCH_EXCEPTIONS = (
    FetchFailure,
    BlockedAddressError,
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and everything it wraps: causes, contexts, urllib3 ``reason``s, args."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        linked.extend(current.args)
        pending.extend(item for item in linked if isinstance(item, BaseException))


def _is_timeout(error: BaseException) -> bool:
    # urllib3's NewConnectionError subclasses ConnectTimeoutError for history's sake;
    # it means the connect failed, not that it timed out.
    if isinstance(error, urllib3.exceptions.NewConnectionError):
        return False
    return isinstance(error, requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError)


def _is_dns(error: BaseException) -> bool:
    return isinstance(error, urllib3.exceptions.NameResolutionError | socket.gaierror)


def _is_tls(error: BaseException) -> bool:
    return isinstance(error, ssl.SSLError | urllib3.exceptions.SSLError)


# Most telling first: a refused connect also shows up as a generic connection error.
_CHAIN_CHECKS = (
    (BLOCKED, lambda error: isinstance(error, BlockedAddressError)),
    (DNS, _is_dns),
    (REFUSED, lambda error: isinstance(error, ConnectionRefusedError)),
    (TLS, _is_tls),
    (TIMEOUT, _is_timeout),
)


def classify(error: BaseException) -> str:
    """The short code for a failed fetch."""
    if isinstance(error, FetchFailure):
        return error.code
    chain = list(_chain(error))
    for code, matches in _CHAIN_CHECKS:
        if any(matches(item) for item in chain):
            return code
    if isinstance(error, requests.exceptions.InvalidURL | urllib3.exceptions.LocationValueError):
        return INVALID_URL
    if isinstance(
        error,
        urllib3.exceptions.ProtocolError
        | requests.exceptions.ChunkedEncodingError
        | http.client.HTTPException,
    ):
        return PROTOCOL
    if isinstance(error, requests.ConnectionError | urllib3.exceptions.HTTPError | OSError):
        return CONNECTION
    return FAILED

"""The JSON bodies of the API: parsing what ``/fetch`` receives, and the one way to render JSON.

``/fetch`` and each ``/batch`` item are answered by ``answer_fetch`` and rendered by
``render_json``, so an item's body in a batch is byte for byte what ``/fetch`` would
have answered for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fetcher.fetching import ALLOWED_SCHEMES, Fetcher

METHODS = ("GET", "HEAD")
JSON_HEADERS = {"content-type": "application/json"}


class InvalidRequest(Exception):
    """The request body is malformed; ``str()`` says why, for the 400 answer."""


@dataclass(frozen=True)
class FetchRequest:
    """A validated ``/fetch`` body."""

    url: str
    method: str = "GET"


def render_json(payload: Any) -> str:
    """Compact JSON text with a final newline (friendly to curl); NaN is refused."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False) + "\n"


def error_body(code: str, message: str) -> dict[str, str]:
    """The body of an error the fetcher itself answers (400, 404, 413 …)."""
    return {"error": code, "message": message}


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise InvalidRequest('"url" must be a non-empty string')
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError as error:
        raise InvalidRequest(f'"url" is malformed: {error}') from None
    if parts.scheme.lower() not in ALLOWED_SCHEMES or not parts.hostname:
        raise InvalidRequest('"url" must be an http or https URL with a host')
    return url


def _check_method(method: Any) -> str:
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise InvalidRequest('"method" must be "GET" or "HEAD"')
    return method.upper()


def parse_fetch_body(body: bytes | None) -> FetchRequest:
    """Validate a ``/fetch`` body: a JSON object with "url" and an optional "method".

    The Content-Type is not required to say JSON: the body is parsed as JSON whatever
    it claims, which is what a caller who forgot the header means.
    """
    try:
        payload = json.loads(body or b"")
    except ValueError:  # includes UnicodeDecodeError
        raise InvalidRequest("body must be a JSON object") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("body must be a JSON object")
    return FetchRequest(
        url=_check_url(payload.get("url")), method=_check_method(payload.get("method", "GET"))
    )


def answer_fetch(fetcher: Fetcher, body: bytes | None) -> tuple[int, dict[str, Any]]:
    """The status and JSON body ``/fetch`` answers for ``body``."""
    try:
        request = parse_fetch_body(body)
    except InvalidRequest as error:
        return 400, error_body("bad-request", str(error))
    return 200, fetcher.fetch(request.url, request.method).to_json()

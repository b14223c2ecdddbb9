"""Fetch one URL: follow redirects by hand, stream the body against a deadline and a size cap.

Redirects are followed here rather than by requests so that each hop is a separate
request through the guarded session (``proxymq.outbound``), whose connections check
the resolved address of every new host before connecting, and so that a hop to a
non-HTTP scheme can be refused.

Limits:

* ``timeout`` bounds the whole fetch, all hops and the body. Each request gets the time
  that is left as its connect and read timeout, and while the body streams the deadline
  is checked after every read and each socket read may wait only until the deadline.
  Residual risk: a server that sends its status line and headers one byte at a time is
  bounded per read (by the time left when the request started), not as a whole, until the
  headers are complete; name resolution is bounded by the system resolver.
* ``max_bytes`` bounds what is read of the body (bytes on the wire, before any content
  decoding). The body is counted and discarded, never held in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from fetcher import errors

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
READ_CHUNK = 64 * 1024
ALLOWED_SCHEMES = ("http", "https")


@dataclass
class FetchResult:
    """What ``/fetch`` answers about one URL; fields describe what was seen before a failure."""

    url: str
    final_url: str
    status: int | None = None
    content_type: str | None = None
    size: int = 0
    elapsed_ms: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the answer; ``error`` only appears on failure."""
        payload: dict[str, Any] = {
            "url": self.url,
            "final_url": self.final_url,
            "status": self.status,
            "content_type": self.content_type,
            "size": self.size,
            "elapsed_ms": self.elapsed_ms,
        }
        if self.error is not None:
            payload["error"] = self.error
        return payload


def _remaining(deadline: float) -> float:
    """Seconds left before ``deadline``; a FetchFailure once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.FetchFailure(errors.TIMEOUT)
    return left


def _redirect_target(session: requests.Session, response: requests.Response) -> str | None:
    """The absolute URL a redirect points to, or None when this is the final answer."""
    location = session.get_redirect_target(response)
    return None if location is None else urljoin(response.url, location)


def _declared_length(response: requests.Response) -> int | None:
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _limit_next_read(response: requests.Response, seconds: float) -> None:
    """Let the next socket read wait at most ``seconds``.

    requests fixes the read timeout per request; shrinking it before each read is what
    makes a server that stalls mid-body fail at the deadline, not a full read timeout
    later. urllib3 sets the timeout afresh when the connection is next taken from the
    pool. ``read_socket`` is kept by ``proxymq.outbound``'s connections.
    """
    sock = getattr(response.raw.connection, "read_socket", None)
    if sock is not None:
        sock.settimeout(seconds)


class Fetcher:
    """Fetches URLs through one session with fixed limits; safe to share between threads."""

    def __init__(self, session: requests.Session, *, timeout: float, max_bytes: int) -> None:
        self.session = session
        self.timeout = timeout
        self.max_bytes = max_bytes

    def fetch(self, url: str, method: str = "GET") -> FetchResult:
        """Fetch ``url``; failures are reported in ``FetchResult.error``, never raised."""
        started = time.monotonic()
        result = FetchResult(url=url, final_url=url)
        try:
            self._follow(result, method, started + self.timeout)
        except errors.FETCH_EXCEPTIONS as error:
            result.status, result.error = None, errors.classify(error)
        except Exception:
            # A bug here must not fail a whole batch: answer this URL as failed and
            # leave the traceback in the log.
            logger.exception("unexpected error fetching %r", url)
            result.status, result.error = None, errors.FAILED
        result.elapsed_ms = round((time.monotonic() - started) * 1000, 3)
        return result

    def _follow(self, result: FetchResult, method: str, deadline: float) -> None:
        """Request ``result.final_url``, hop by hop, until an answer that is no redirect."""
        for _hop in range(MAX_REDIRECTS + 1):
            with self._send(method, result.final_url, deadline) as response:
                target = _redirect_target(self.session, response)
                if target is None:
                    result.status = response.status_code
                    result.content_type = response.headers.get("Content-Type")
                    self._read_body(response, result, deadline)
                    return
            # final_url is where the fetch went last, even if that hop is then refused.
            result.final_url = target
            if urlsplit(target).scheme.lower() not in ALLOWED_SCHEMES:
                raise errors.FetchFailure(errors.BAD_REDIRECT)
        raise errors.FetchFailure(errors.TOO_MANY_REDIRECTS)

    def _send(self, method: str, url: str, deadline: float) -> requests.Response:
        left = _remaining(deadline)
        return self.session.request(
            method, url, allow_redirects=False, stream=True, timeout=(left, left)
        )

    def _read_body(self, response: requests.Response, result: FetchResult, deadline: float) -> None:
        """Count the body's bytes until its end, the size cap or the deadline."""
        declared = _declared_length(response)
        if declared is not None and declared > self.max_bytes:
            # No point downloading what will be refused; nothing was read.
            raise errors.FetchFailure(errors.TOO_LARGE)
        while True:
            _limit_next_read(response, _remaining(deadline))
            # Ask for one byte past the cap at most: enough to know it is exceeded.
            wanted = min(READ_CHUNK, self.max_bytes - result.size + 1)
            chunk = response.raw.read1(wanted, decode_content=False)
            if not chunk:
                return
            result.size += len(chunk)
            if result.size > self.max_bytes:
                raise errors.FetchFailure(errors.TOO_LARGE)

"""Words: an example downstream that streams, as Server-Sent Events.

``GET /words?text=the+quick+brown+fox&delay_ms=50`` answers ``200 text/event-stream``
and sends each word of ``text`` as one event, ``data: <word>\\n\\n``, the first at once
and each next one ``delay_ms`` later, then ``event: end`` with the number of words as
its data (so an ``EventSource`` knows not to reconnect), then the end of the body. There
is no Content-Length: gunicorn sends the body chunked, one chunk per event, which is
what makes ProxyMQ relay it part by part (docs/streaming.md).

Run it with gunicorn's gevent worker (``gunicorn.conf.py`` picks it; ``time.sleep`` then
yields, so one process streams to many clients at once)::

    gunicorn examples.words:app -b 0.0.0.0:8090

Plain WSGI and the standard library only; it imports nothing of ProxyMQ.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from urllib.parse import parse_qs

DEFAULT_TEXT = "the quick brown fox jumps over the lazy dog"
DEFAULT_DELAY_MS = 50
MAX_TEXT_CHARS = 10_000
MAX_DELAY_MS = 10_000


class BadRequest(ValueError):
    pass


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    method = environ.get("REQUEST_METHOD", "GET")
    if path == "/healthz":
        return _answer(start_response, "200 OK", {"status": "ok"})
    if path != "/words":
        return _answer(start_response, "404 Not Found", {"error": "not-found"})
    if method not in ("GET", "HEAD"):
        return _answer(start_response, "405 Method Not Allowed", {"error": "method-not-allowed"})
    try:
        words, delay = parse(environ.get("QUERY_STRING", ""))
    except BadRequest as error:
        return _answer(start_response, "400 Bad Request", {"error": str(error)})
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),  # and no proxy in front should buffer it either
        ],
    )
    if method == "HEAD":
        return []
    return events(words, delay)


def parse(query: str) -> tuple[list[str], float]:
    """The words of ``text`` and the delay between them in seconds."""
    values = parse_qs(query, keep_blank_values=True)
    text = values.get("text", [DEFAULT_TEXT])[-1]
    if len(text) > MAX_TEXT_CHARS:
        raise BadRequest(f"text is over {MAX_TEXT_CHARS} characters")
    raw_delay = values.get("delay_ms", [str(DEFAULT_DELAY_MS)])[-1]
    try:
        delay_ms = float(raw_delay)
    except ValueError:
        raise BadRequest("delay_ms must be a number") from None
    if not 0 <= delay_ms <= MAX_DELAY_MS:  # also refuses nan
        raise BadRequest(f"delay_ms must be between 0 and {MAX_DELAY_MS}")
    return text.split(), delay_ms / 1000


def events(words: list[str], delay: float) -> Iterator[bytes]:
    """One SSE event per word (a word has no line break: ``split`` took them all)."""
    for number, word in enumerate(words):
        if number:
            time.sleep(delay)
        yield f"data: {word}\n\n".encode()
    yield f"event: end\ndata: {len(words)}\n\n".encode()


def _answer(start_response, status: str, body: dict) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]

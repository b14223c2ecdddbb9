"""What the gateway answers: a status, headers and a body, as a WSGI application.

The proxy route builds its answer without Flask (``gateway.proxy``); the Flask views
(``gateway.views``) return the same object, which Flask accepts as a WSGI callable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus

from gateway.errors import GatewayError
from proxymq.envelope import ReplyEnvelope

Headers = list[tuple[str, str]]

_PHRASES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}
# RFC 9110 §8.6: no Content-Length (and no body) on these.
_BODILESS = frozenset({204, 304})


def status_line(status: int) -> str:
    return _PHRASES.get(status) or f"{status} Unknown"


@dataclass(slots=True)
class Answer:
    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""

    def __call__(self, environ, start_response):
        start_response(status_line(self.status), self.headers)
        return [self.body]


def json_answer(status: int, body: dict, headers: Headers = ()) -> Answer:
    data = json.dumps(body).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        *headers,
    ]
    return Answer(status, headers, data)


def error_answer(error: GatewayError, correlation_id: str | None) -> Answer:
    """The gateway's own error: ``X-ProxyMQ-Error`` and SPEC's JSON body."""
    body = {"error": error.code, "message": error.message, "correlation_id": correlation_id}
    headers = [("X-ProxyMQ-Error", error.code)]
    if correlation_id:
        headers.append(("X-Correlation-ID", correlation_id))
    if error.retry_after is not None:
        headers.append(("Retry-After", str(error.retry_after)))
    return json_answer(error.status, body, headers)


def reply_answer(reply: ReplyEnvelope, correlation_id: str, method: str) -> Answer:
    """The downstream's answer as the client gets it.

    Its Content-Length is never copied blindly: the client's connection is framed by
    the body actually sent, so a downstream whose own framing disagreed with itself
    cannot desynchronize it. A HEAD answer keeps the downstream's (it has no body to
    measure); 204 and 304 carry none.
    """
    if reply.error:
        error = GatewayError(reply.status, reply.error, reply.message)
        return error_answer(error, correlation_id)
    headers = [(n, v) for n, v in reply.headers if n.lower() != "content-length"]
    body = reply.body
    if reply.status in _BODILESS or reply.status < 200:
        body = b""
    elif method == "HEAD":
        headers += [(n, v) for n, v in reply.headers if n.lower() == "content-length"][:1]
        body = b""
    else:
        headers.append(("Content-Length", str(len(body))))
    headers.append(("X-Correlation-ID", correlation_id))
    return Answer(reply.status, headers, body)

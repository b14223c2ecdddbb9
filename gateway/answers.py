"""What the gateway answers: a status, headers and a body, as a WSGI application.

The proxy route builds its answer without Flask (``gateway.proxy``); the Flask views
(``gateway.views``) return the same object, which Flask accepts as a WSGI callable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

from gateway.errors import GatewayError
from proxymq.envelope import ReplyEnvelope
from proxymq.jobs import QUEUED

if TYPE_CHECKING:
    from proxymq.idempotency import Record

Headers = list[tuple[str, str]]
REPLAYED_HEADER = "Idempotent-Replayed"

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


def job_accepted(job_id: str, correlation_id: str) -> Answer:
    """202 for a job: its id and location (``/jobs/<id>``), to poll for its answer."""
    location = f"/jobs/{job_id}"
    return json_answer(
        202,
        {"id": job_id, "status": QUEUED, "location": location},
        [
            ("Location", location),
            ("X-Correlation-ID", correlation_id),
            ("Preference-Applied", "respond-async"),
        ],
    )


def replay_answer(record: Record, method: str, anonymous: bool) -> Answer:
    """A synchronous repeat's answer (``Idempotency-Key``): the first request's answer,
    or the 202 of the job it submitted; marked as a replay."""
    if record.reply is not None:
        answer = reply_answer(record.reply, record.correlation_id, method)
    else:
        answer = job_accepted(record.job_id, record.correlation_id)
    return replayed(answer, anonymous)


def replayed(answer: Answer, anonymous: bool) -> Answer:
    """A repeat's answer (``Idempotency-Key``), marked as a replay. The anonymous scope is
    every client that presented no credential, so its replays leave ``Set-Cookie`` out:
    a session the first call opened belongs to its caller alone."""
    if anonymous:
        answer.headers = [(n, v) for n, v in answer.headers if n.lower() != "set-cookie"]
    answer.headers.append((REPLAYED_HEADER, "true"))
    return answer


def error_answer(error: GatewayError, correlation_id: str | None) -> Answer:
    """The gateway's own error: ``X-ProxyMQ-Error`` and SPEC's JSON body."""
    body = {"error": error.code, "message": error.message, "correlation_id": correlation_id}
    headers = [("X-ProxyMQ-Error", error.code)]
    if correlation_id:
        headers.append(("X-Correlation-ID", correlation_id))
    if error.retry_after is not None:
        headers.append(("Retry-After", str(error.retry_after)))
    return json_answer(error.status, body, headers)


# What marks an answer as the gateway's: its error code (any X-ProxyMQ-*), its correlation
# id, a replay. A downstream's answer never carries them, or a client could not tell the
# gateway's errors from the downstream's answers (SPEC), and would get two correlation ids.
_GATEWAYS_OWN = ("x-correlation-id", "idempotent-replayed")


def from_downstream(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The downstream's answer headers without those only the gateway sets."""
    return [
        (n, v)
        for n, v in headers
        if n.lower() not in _GATEWAYS_OWN and not n.lower().startswith("x-proxymq-")
    ]


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
    headers = [(n, v) for n, v in from_downstream(reply.headers) if n.lower() != "content-length"]
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

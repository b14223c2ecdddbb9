"""One batch call: SPEC.md's JSON array out, one reply per request back.

Pure translation plus one HTTP call, no queue or thread logic (that is
``workers.batching``), so the wire format is read in one place. Nothing here raises for a
downstream failure: a failed call becomes 502 ``bad-batch-response`` for every request
in it, an answer lacking an item becomes 502 for that request alone, and a malformed
answer is just another failed call, so no downstream can crash a worker.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

import requests

from proxymq.config import ServiceConfig
from proxymq.envelope import ReplyEnvelope, RequestEnvelope
from proxymq.headers import end_to_end
from workers import forwarding

ERROR = "bad-batch-response"


class BatchFailed(Exception):
    """The batch call as a whole failed; ``str()`` says why (it reaches the client)."""


@dataclass(frozen=True, slots=True)
class Item:
    """One request of a batch, with what the downstream is told about it."""

    correlation_id: str
    request: RequestEnvelope
    deliveries: int


def bad_batch(message: str) -> ReplyEnvelope:
    return ReplyEnvelope(status=502, error=ERROR, message=message)


def encode_item(item: Item) -> dict[str, Any]:
    """The item as SPEC.md's batch contract says.

    ``headers`` is a JSON object, so names are lower-cased (object keys are
    case-sensitive; HTTP names are not) and repeated ones joined with ", " as HTTP
    allows. They carry the item's ``X-Correlation-ID``, delivery count and deadline, as
    a single call's headers would.
    """
    request = item.request
    headers: dict[str, str] = {}
    for name, value in forwarding.downstream_headers(request, item.correlation_id, item.deliveries):
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    wire: dict[str, Any] = {
        "correlation_id": item.correlation_id,
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": headers,
    }
    if not request.body:
        wire["body"] = None
        return wire
    try:
        wire["body"] = request.body.decode("utf-8")
    except UnicodeDecodeError:
        wire["body_base64"] = base64.b64encode(request.body).decode("ascii")
    return wire


def call(
    http: requests.Session, service: ServiceConfig, items: list[Item]
) -> dict[str, ReplyEnvelope]:
    """Every item's reply, keyed by correlation id; never raises."""
    try:
        answers = _post(http, service, items)
    except BatchFailed as exc:
        return {item.correlation_id: bad_batch(str(exc)) for item in items}
    missing = bad_batch("the batch answer has no item for this request")
    return {item.correlation_id: answers.get(item.correlation_id, missing) for item in items}


def _post(
    http: requests.Session, service: ServiceConfig, items: list[Item]
) -> dict[str, ReplyEnvelope]:
    """Send the batch; wait no longer than its latest deadline or ``downstream_timeout``."""
    deadlines = [item.request.deadline for item in items]
    budget = min(service.downstream_timeout, max(deadlines) / 1000 - time.time())
    if budget <= 0:
        raise BatchFailed("every deadline of the batch passed before the call")
    data = json.dumps([encode_item(item) for item in items], separators=(",", ":"))
    headers = {"Content-Type": "application/json", "X-ProxyMQ-Deadline": str(min(deadlines))}
    try:
        response = http.post(
            service.batch_url or "",
            data=data.encode("utf-8"),
            headers=headers,
            timeout=budget,
            allow_redirects=False,
        )
        content = response.content
    except (requests.RequestException, OSError) as exc:
        raise BatchFailed(f"batch call failed: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise BatchFailed(f"the batch endpoint answered {response.status_code}, not 200")
    try:
        payload = json.loads(content)
    except ValueError:
        raise BatchFailed("the batch answer is not JSON") from None
    if not isinstance(payload, list):
        raise BatchFailed("the batch answer is not a JSON array")
    return parse_answer(payload)


def parse_answer(payload: list) -> dict[str, ReplyEnvelope]:
    """Replies by correlation id. An element without a usable ``correlation_id`` is
    skipped (its request then counts as missing); a malformed element with one becomes
    that request's 502. The first element for a correlation id wins."""
    replies: dict[str, ReplyEnvelope] = {}
    for element in payload:
        if not isinstance(element, dict):
            continue
        correlation_id = element.get("correlation_id")
        if not isinstance(correlation_id, str) or correlation_id in replies:
            continue
        try:
            replies[correlation_id] = _reply(element)
        except ValueError as exc:
            replies[correlation_id] = bad_batch(f"malformed answer item: {exc}")
    return replies


def _reply(element: dict) -> ReplyEnvelope:
    status = element.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise ValueError(f'"status" must be an HTTP status, got {status!r}')
    headers = end_to_end(_headers(element.get("headers") or {}))
    return ReplyEnvelope(status=status, headers=headers, body=_body(element))


def _headers(raw: Any) -> list[tuple[str, str]]:
    """An object of name -> value (or list of values, for repeated headers)."""
    if not isinstance(raw, dict):
        raise ValueError('"headers" must be an object')
    pairs = []
    for name, value in raw.items():
        for one in value if isinstance(value, list) else [value]:
            if not isinstance(one, str):
                raise ValueError(f"header {name!r} must be a string")
            pairs.append((name, one))
    return pairs


def _body(element: dict) -> bytes:
    if element.get("body_base64") is not None:
        encoded = element["body_base64"]
        if not isinstance(encoded, str):
            raise ValueError('"body_base64" must be a string')
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ValueError('"body_base64" is not valid base64') from None
    body = element.get("body")
    if body is None:
        return b""
    if not isinstance(body, str):
        raise ValueError('"body" must be a string or null')
    return body.encode("utf-8")

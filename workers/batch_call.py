"""One batch call: SPEC.md's JSON array out, one reply per request back.

Pure translation plus one HTTP call, no queue or thread logic (that is
``workers.batching``), so the wire format is read in one place. Nothing here raises for
a downstream failure: a failed call becomes 502 ``bad-batch-response`` for every request
in it (504 ``timeout`` when their deadline cut it off), an answer lacking an item becomes
502 for that request alone, and a malformed answer is just another failed call, so no
downstream can crash a worker.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

import requests

from proxymq import outbound, tracing
from proxymq.envelope import ReplyEnvelope
from proxymq.headers import end_to_end
from workers import forwarding
from workers.delivery import Delivery
from workers.observers import observe

ERROR = "bad-batch-response"


class BatchFailed(Exception):
    """The batch call as a whole failed; ``reply`` is every request's answer."""

    def __init__(self, reply: ReplyEnvelope) -> None:
        super().__init__(reply.message)
        self.reply = reply


def bad_batch(message: str) -> ReplyEnvelope:
    return ReplyEnvelope(status=502, error=ERROR, message=message)


def encode_item(item: Delivery) -> dict[str, Any]:
    """The item as SPEC.md's batch contract says.

    ``headers`` is a JSON object, so names are lower-cased (object keys are
    case-sensitive; HTTP names are not) and repeated ones joined with ", " as HTTP
    allows. They carry the item's ``X-Correlation-ID``, delivery count and deadline, as
    a single call's headers would.
    """
    request = item.request
    headers: dict[str, str] = {}
    for name, value in forwarding.downstream_headers(item):
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    wire: dict[str, Any] = {
        "correlation_id": item.correlation_id,
        "method": request.method,
        "path": request.path,
        "query": request.query or "",  # the contract's string: no "?" and "?" alike
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


def call(http: requests.Session, batch: list[Delivery], limit: int) -> dict[str, ReplyEnvelope]:
    """Every delivery's reply, keyed by correlation id; never raises.

    ``limit`` (``PROXYMQ_MAX_RESPONSE_BYTES``) bounds each item's body, as it bounds a
    single call's answer; the batch answer as a whole may be twice the items' limits
    (room for JSON escapes and base64), and beyond that is not read at all.
    """
    try:
        answers = _post(http, batch, limit)
    except BatchFailed as exc:
        return {item.correlation_id: exc.reply for item in batch}
    missing = bad_batch("the batch answer has no item for this request")
    return {item.correlation_id: answers.get(item.correlation_id, missing) for item in batch}


def _post(http: requests.Session, batch: list[Delivery], limit: int) -> dict[str, ReplyEnvelope]:
    """Send the batch; wait no longer than its latest deadline or ``downstream_timeout``."""
    service = batch[0].service
    deadlines = [item.request.deadline for item in batch]
    seconds, deadline_bound = forwarding.budget(service, max(deadlines))
    if seconds <= 0:
        raise BatchFailed(forwarding.timed_out())
    data = json.dumps([encode_item(item) for item in batch], separators=(",", ":"))
    headers = {"Content-Type": "application/json", "X-ProxyMQ-Deadline": str(min(deadlines))}
    if tracing.ENABLED:
        headers.update(observe(tracing.inject) or {})  # the batch call's own span (workers.tracing)
    what, cap = f"batch call to {service.name}", 2 * limit * len(batch)
    # The whole call, head and answer, ends by the latest deadline: its socket is shut
    # then (``proxymq.outbound.bounded``), however slowly the downstream trickles.
    with outbound.bounded(time.monotonic() + seconds) as bound:
        try:
            status, content = _exchange(http, service.batch_url or "", data, headers, seconds, cap)
            error = None
        except forwarding.FAILURES as exc:
            error = exc
    if bound.cut or error is not None:
        if bound.cut:  # whatever it raised or returned: an answer read to its close is short
            reply = forwarding.cut_off(deadline_bound, what)
        else:
            reply = forwarding.failure(error, deadline_bound, what)
        if reply.error != "timeout":
            reply = bad_batch(f"the batch call failed: {reply.message}")
        raise BatchFailed(reply)
    if status != 200:
        raise BatchFailed(bad_batch(f"the batch endpoint answered {status}, not 200"))
    try:
        payload = json.loads(content)
    except ValueError:
        raise BatchFailed(bad_batch("the batch answer is not JSON")) from None
    if not isinstance(payload, list):
        raise BatchFailed(bad_batch("the batch answer is not a JSON array"))
    return parse_answer(payload, limit)


def _exchange(
    http: requests.Session, url: str, data: str, headers: dict, seconds: float, cap: int
) -> tuple[int, bytes]:
    """POST the batch; its status and body (at most ``cap`` bytes)."""
    response = http.post(
        url,
        data=data.encode("utf-8"),
        headers=headers,
        timeout=seconds,
        allow_redirects=False,
        stream=True,
    )
    return response.status_code, _read_capped(response, cap)


def _read_capped(response: requests.Response, cap: int) -> bytes:
    """The answer's body, or ``BatchFailed`` (response-too-large) past ``cap`` bytes."""
    with response:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise BatchFailed(forwarding.too_large(cap))
        content = response.raw.read(cap + 1, decode_content=True)
    if len(content) > cap:
        raise BatchFailed(forwarding.too_large(cap))
    return content


def parse_answer(payload: list, limit: int) -> dict[str, ReplyEnvelope]:
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
            reply = _reply(element)
        except ValueError as exc:
            reply = bad_batch(f"malformed answer item: {exc}")
        replies[correlation_id] = forwarding.too_large(limit) if len(reply.body) > limit else reply
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

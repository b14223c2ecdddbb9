"""What a dead letter says, and the request a replay publishes in its place.

Pure functions over a message's body, headers and properties, for the ``deadletters``
command (``workers.deadletters_command``), which does the broker's part.

A replayed request is the dead letter's request with what would make it fail again
taken away:

- a fresh delivery count: the workers' own count (``proxymq_deliveries``) and a quorum
  queue's ``x-delivery-count`` dropped, so the first delivery is number 1 again;
- a fresh deadline: a dead letter's is long past (its client gave up), and a worker
  drops an expired request unseen. The new one is as long as the original's was
  (deadline minus the gateway's publish time), or ``DEFAULT_BUDGET_MS`` when the
  message does not tell;
- no reply queue: the gateway process that waited is gone or has given up, so the
  answer of a plain replay goes nowhere (with ``--as-jobs`` it is stored instead); a
  dead-lettered job, too, is replayed plainly as a request;
- ``x-proxymq-replayed`` counting the replays (the downstream sees
  ``X-ProxyMQ-Replayed``), and the dead-letter marks removed.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from proxymq.confirms import PUBLISH_ID
from proxymq.envelope import (
    CONTENT_TYPE,
    DELIVERIES_HEADER,
    REPLAYED_HEADER,
    SENT_HEADER,
    TASK_NAME,
    RequestEnvelope,
    request_from_task,
    task_body,
)
from workers.delivery import delivery_count
from workers.poison import DEAD_AT_HEADER, DEAD_DELIVERIES_HEADER, REASON_HEADER

DEFAULT_BUDGET_MS = 120_000
# Marks of a message's past that a replayed copy must not carry.
_DROPPED_HEADERS = frozenset(
    {
        DELIVERIES_HEADER,
        "x-delivery-count",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        REASON_HEADER,
        DEAD_AT_HEADER,
        DEAD_DELIVERIES_HEADER,
        PUBLISH_ID,
    }
)
# Properties the copy does not keep: a new deadline, nobody waiting, a new publisher.
_DROPPED_PROPERTIES = frozenset({"expiration", "reply_to", "user_id", "application_headers"})


class NotARequest(ValueError):
    """A dead letter that is not a ProxyMQ request (it was dead-lettered as malformed):
    replaying it would only dead-letter it again, so it stays where it is."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What ``deadletters list`` shows of one message (never its body unless asked)."""

    correlation_id: str
    reason: str
    deliveries: int
    dead_at: int | None  # epoch ms when it was dead-lettered; None: not said

    def age(self, now_ms: int) -> float | None:
        """Seconds since it was dead-lettered."""
        return None if self.dead_at is None else max(0, now_ms - self.dead_at) / 1000


def describe(headers: dict | None, properties: dict) -> DeadLetter:
    headers = headers if isinstance(headers, dict) else {}
    deliveries = _int(headers.get(DEAD_DELIVERIES_HEADER))
    if deliveries is None:  # dead-lettered before the workers marked it
        deliveries = delivery_count(headers, False)
    dead_at = _int(headers.get(DEAD_AT_HEADER))
    correlation_id = properties.get("correlation_id")
    return DeadLetter(
        correlation_id=correlation_id if isinstance(correlation_id, str) else "",
        reason=str(headers.get(REASON_HEADER, "")),
        deliveries=deliveries,
        dead_at=dead_at if dead_at is not None else _int(headers.get(SENT_HEADER)),
    )


@dataclass(frozen=True, slots=True)
class Replay:
    """The request to publish in a dead letter's place."""

    body: bytes
    headers: dict
    properties: dict
    request: RequestEnvelope


def replay_of(
    body: bytes, headers: dict | None, properties: dict, job_timeout_ms: int | None = None
) -> Replay:
    """The copy to publish to the service's queue; ``NotARequest`` when there is none.

    ``job_timeout_ms``: replay as an asynchronous job with that deadline (``--as-jobs``),
    under a correlation id of its own (the original's may already name a job record,
    whose owner must keep it); else a plain replay, under the original's correlation id
    so the downstream can tell it has seen the request before.
    """
    headers = headers if isinstance(headers, dict) else {}
    if headers.get("task") != TASK_NAME or properties.get("content_type") != CONTENT_TYPE:
        raise NotARequest(f"not a {TASK_NAME} request")
    if not isinstance(properties.get("correlation_id"), str):
        raise NotARequest("no correlation id")
    try:
        request = request_from_task(body)
    except ValueError as exc:
        raise NotARequest(str(exc)) from None
    now = int(time.time() * 1000)
    if job_timeout_ms is not None:
        budget = job_timeout_ms
        request.job, correlation_id = True, str(uuid.uuid4())
    else:
        budget = _original_budget(request, headers)
        correlation_id = properties["correlation_id"]
        # A dead-lettered job's record is done (it holds the poison answer): a worker
        # would skip the same job as finished, and the replay would call nothing. So a
        # plain replay is a plain request, its answer going nowhere like the others';
        # ``--as-jobs`` stores it.
        request.job, request.callback = False, None
    request.deadline = now + budget
    copy_headers = {k: v for k, v in headers.items() if k not in _DROPPED_HEADERS}
    copy_headers[REPLAYED_HEADER] = (_int(headers.get(REPLAYED_HEADER)) or 0) + 1
    copy_headers[SENT_HEADER] = now
    copy_headers["id"] = copy_headers["root_id"] = correlation_id
    copy_headers["expires"] = datetime.fromtimestamp(request.deadline / 1000, tz=UTC).isoformat()
    copy = {k: v for k, v in properties.items() if k not in _DROPPED_PROPERTIES}
    copy.update(
        correlation_id=correlation_id,
        expiration=str(budget),
        delivery_mode=2 if request.job else copy.get("delivery_mode", 1),
    )
    return Replay(task_body([request.to_wire()]), copy_headers, copy, request)


def _original_budget(request: RequestEnvelope, headers: dict) -> int:
    sent = _int(headers.get(SENT_HEADER))
    if sent is None or request.deadline <= sent:
        return DEFAULT_BUDGET_MS
    return request.deadline - sent


def _int(value: object) -> int | None:
    return value if type(value) is int else None

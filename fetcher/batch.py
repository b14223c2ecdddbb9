"""``/batch``: many ``/fetch`` requests in one call, answered concurrently.

The envelope follows the SPEC's batch downstream contract. Problems with the envelope
(not an array, too many items, an item without a ``correlation_id``) fail the whole call,
because there is no item to attach the answer to; problems inside one item (wrong path,
bad body) are that item's answer only, as they would be for separate calls.
"""

from __future__ import annotations

import base64
import binascii
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fetcher.fetching import Fetcher
from fetcher.payloads import JSON_HEADERS, answer_fetch, error_body, render_json

FETCH_PATH = "/fetch"


class InvalidBatch(Exception):
    """The batch envelope is malformed (answered 400)."""


class BatchTooLarge(Exception):
    """More items than ``FETCHER_BATCH_SIZE`` (answered 413)."""


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch, as the worker sent it."""

    correlation_id: str
    method: Any
    path: Any
    body: Any
    body_base64: Any


def parse_batch(payload: Any, limit: int) -> list[BatchItem]:
    """Check the envelope and return its items; item contents are checked when answered."""
    if not isinstance(payload, list):
        raise InvalidBatch("body must be a JSON array of batch items")
    if len(payload) > limit:
        raise BatchTooLarge(f"batch has {len(payload)} items, at most {limit} are accepted")
    return [_parse_item(index, item) for index, item in enumerate(payload)]


def _parse_item(index: int, item: Any) -> BatchItem:
    if not isinstance(item, dict):
        raise InvalidBatch(f"item {index} must be a JSON object")
    correlation_id = item.get("correlation_id")
    if not isinstance(correlation_id, str) or not correlation_id:
        raise InvalidBatch(f'item {index} needs a non-empty string "correlation_id"')
    return BatchItem(
        correlation_id=correlation_id,
        method=item.get("method"),
        path=item.get("path"),
        body=item.get("body"),
        body_base64=item.get("body_base64"),
    )


def _item_body(item: BatchItem) -> bytes | None:
    """The item's body bytes: ``body_base64`` when present, else the UTF-8 ``body``."""
    if item.body_base64 is not None:
        if not isinstance(item.body_base64, str):
            raise ValueError('"body_base64" must be a string')
        try:
            return base64.b64decode(item.body_base64, validate=True)
        except binascii.Error:
            raise ValueError('"body_base64" is not valid base64') from None
    if item.body is None or isinstance(item.body, str):
        return None if item.body is None else item.body.encode("utf-8")
    raise ValueError('"body" must be a string or null')


def _route(fetcher: Fetcher, item: BatchItem) -> tuple[int, dict[str, Any]]:
    """What the app would answer for this item as a separate request."""
    if item.path != FETCH_PATH:
        return 404, error_body("not-found", f"no endpoint {item.path!r} in a batch")
    if not isinstance(item.method, str) or item.method.upper() != "POST":
        return 405, error_body("method-not-allowed", f"{FETCH_PATH} takes POST")
    try:
        body = _item_body(item)
    except ValueError as error:
        return 400, error_body("bad-request", str(error))
    return answer_fetch(fetcher, body)


def answer_item(fetcher: Fetcher, item: BatchItem) -> dict[str, Any]:
    """One element of the batch answer."""
    status, payload = _route(fetcher, item)
    return {
        "correlation_id": item.correlation_id,
        "status": status,
        "headers": dict(JSON_HEADERS),
        "body": render_json(payload),
    }


def answer_batch(fetcher: Fetcher, items: list[BatchItem]) -> list[dict[str, Any]]:
    """Answer all items at once, one thread per item, in the order received.

    ``parse_batch`` already capped the number of items at ``FETCHER_BATCH_SIZE``, so the
    pool is bounded by it. Under gevent workers the threads are greenlets.
    """
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="fetch") as pool:
        return list(pool.map(lambda item: answer_item(fetcher, item), items))

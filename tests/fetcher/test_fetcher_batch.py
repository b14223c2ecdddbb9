"""``/batch`` against a real local server: items are fetched concurrently."""

from __future__ import annotations

import json
import time

from fetcher.config import FetcherConfig
from fetcher.web import create_app


def _fetch_item(correlation_id: str, url: str) -> dict:
    return {
        "correlation_id": correlation_id,
        "method": "POST",
        "path": "/fetch",
        "query": "",
        "headers": {"content-type": "application/json"},
        "body": json.dumps({"url": url}),
    }


def test_batch_items_are_fetched_concurrently(local_server) -> None:
    client = create_app(FetcherConfig(allow_private=True)).test_client()
    url = local_server.url("/sleep?s=0.5")
    items = [_fetch_item(f"c{n}", url) for n in range(5)]

    started = time.monotonic()
    response = client.post("/batch", json=items)
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    answers = response.get_json()
    assert [answer["correlation_id"] for answer in answers] == ["c0", "c1", "c2", "c3", "c4"]
    for answer in answers:
        assert answer["status"] == 200
        assert json.loads(answer["body"])["status"] == 200
    # All five at once (max_in_flight); one after another would take 2.5 s.
    assert local_server.max_in_flight == 5
    assert elapsed < 2.5


def test_batch_mixes_successes_and_failures(local_server, closed_port: int) -> None:
    client = create_app(FetcherConfig(allow_private=True, max_bytes=100)).test_client()
    items = [
        _fetch_item("ok", local_server.url("/ok")),
        _fetch_item("big", local_server.url("/bytes/101")),
        _fetch_item("refused", f"http://127.0.0.1:{closed_port}/"),
    ]
    answers = client.post("/batch", json=items).get_json()
    bodies = {answer["correlation_id"]: json.loads(answer["body"]) for answer in answers}
    assert bodies["ok"]["status"] == 200 and "error" not in bodies["ok"]
    assert bodies["big"]["error"] == "too-large"
    assert bodies["refused"]["error"] == "connection-refused"
    assert {answer["status"] for answer in answers} == {200}

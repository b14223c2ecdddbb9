"""The HTTP API through Flask's test client: JSON shapes, input errors, the batch envelope.

Nothing here reaches a server: URLs point at refused addresses (the guard answers) so
the shapes are checked without network, and ``loopback_only`` proves no connect happens.
"""

from __future__ import annotations

import base64
import json

import pytest
from flask.testing import FlaskClient

from fetcher.config import FetcherConfig
from fetcher.web import create_app

RESULT_KEYS = {"url", "final_url", "status", "content_type", "size", "elapsed_ms"}
BLOCKED_URL = "http://169.254.169.254/latest/meta-data/"


@pytest.fixture
def client() -> FlaskClient:
    return create_app(FetcherConfig()).test_client()


def _item(correlation_id: str, body: object = None, **overrides: object) -> dict:
    """A batch item as the worker sends it; ``body`` is JSON-encoded unless it is a str."""
    text = body if isinstance(body, str) or body is None else json.dumps(body)
    item = {
        "correlation_id": correlation_id,
        "method": "POST",
        "path": "/fetch",
        "query": "",
        "headers": {"content-type": "application/json"},
        "body": text,
    }
    item.update(overrides)
    return item


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_fetch_of_a_refused_address_has_the_full_shape(client: FlaskClient, loopback_only) -> None:
    response = client.post("/fetch", json={"url": BLOCKED_URL})
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == RESULT_KEYS | {"error"}
    assert body["url"] == BLOCKED_URL
    assert body["final_url"] == BLOCKED_URL
    assert body["status"] is None
    assert body["content_type"] is None
    assert body["size"] == 0
    assert isinstance(body["elapsed_ms"], float) and body["elapsed_ms"] >= 0
    assert body["error"] == "blocked-address"
    assert loopback_only == []


def test_fetch_parses_json_whatever_the_content_type(client: FlaskClient) -> None:
    response = client.post(
        "/fetch", data=json.dumps({"url": BLOCKED_URL}), content_type="text/plain"
    )
    assert response.status_code == 200
    assert response.get_json()["error"] == "blocked-address"


def test_fetch_accepts_head_in_any_case(client: FlaskClient) -> None:
    response = client.post("/fetch", json={"url": BLOCKED_URL, "method": "head"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "body must be a JSON object"),
        (b"", "body must be a JSON object"),
        (b"\xff\xfe", "body must be a JSON object"),
        (b'["http://example.com/"]', "body must be a JSON object"),
        (b"{}", '"url" must be a non-empty string'),
        (b'{"url": 42}', '"url" must be a non-empty string'),
        (b'{"url": ""}', '"url" must be a non-empty string'),
        (b'{"url": "ftp://example.com/file"}', '"url" must be an http or https URL with a host'),
        (b'{"url": "file:///etc/passwd"}', '"url" must be an http or https URL with a host'),
        (b'{"url": "example.com"}', '"url" must be an http or https URL with a host'),
        (b'{"url": "http://"}', '"url" must be an http or https URL with a host'),
        (b'{"url": "http://example.com:99999/"}', '"url" is malformed: Port out of range 0-65535'),
        (b'{"url": "http://[::1/"}', '"url" is malformed: Invalid IPv6 URL'),
        (b'{"url": "http://example.com/", "method": "POST"}', '"method" must be "GET" or "HEAD"'),
        (b'{"url": "http://example.com/", "method": 1}', '"method" must be "GET" or "HEAD"'),
    ],
)
def test_malformed_fetch_bodies_are_400(client: FlaskClient, data: bytes, message: str) -> None:
    response = client.post("/fetch", data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json() == {"error": "bad-request", "message": message}


def test_fetch_takes_only_post(client: FlaskClient) -> None:
    response = client.get("/fetch")
    assert response.status_code == 405
    assert response.get_json()["error"] == "method-not-allowed"
    assert "POST" in response.headers["Allow"]


def test_unknown_paths_are_json_404(client: FlaskClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not-found"


def test_batch_answers_each_item_in_order(client: FlaskClient, loopback_only) -> None:
    items = [_item(f"id-{n}", {"url": BLOCKED_URL}) for n in range(3)]
    response = client.post("/batch", json=items)
    assert response.status_code == 200
    answers = response.get_json()
    assert [answer["correlation_id"] for answer in answers] == ["id-0", "id-1", "id-2"]
    for answer in answers:
        assert set(answer) == {"correlation_id", "status", "headers", "body"}
        assert answer["status"] == 200
        assert answer["headers"] == {"content-type": "application/json"}
        body = json.loads(answer["body"])
        assert set(body) == RESULT_KEYS | {"error"}
        assert body["error"] == "blocked-address"
    assert loopback_only == []


def test_batch_item_body_is_what_fetch_answers(client: FlaskClient) -> None:
    bad_body = '{"url": "gopher://example.com/"}'
    direct = client.post("/fetch", data=bad_body)
    [answer] = client.post("/batch", json=[_item("a", bad_body)]).get_json()
    assert answer["status"] == direct.status_code == 400
    assert answer["body"] == direct.get_data(as_text=True)


def test_batch_item_errors_stay_in_their_item(client: FlaskClient) -> None:
    items = [
        _item("wrong-path", {"url": BLOCKED_URL}, path="/elsewhere"),
        _item("wrong-method", {"url": BLOCKED_URL}, method="GET"),
        _item("no-body", None),
        _item("not-json", "{oops"),
        _item("bad-base64", None, body_base64="***"),
        {**_item("body-not-text"), "body": ["x"]},
        _item("fine", {"url": BLOCKED_URL}),
    ]
    answers = client.post("/batch", json=items).get_json()
    statuses = {answer["correlation_id"]: answer["status"] for answer in answers}
    assert statuses == {
        "wrong-path": 404,
        "wrong-method": 405,
        "no-body": 400,
        "not-json": 400,
        "bad-base64": 400,
        "body-not-text": 400,
        "fine": 200,
    }
    errors = {answer["correlation_id"]: json.loads(answer["body"])["error"] for answer in answers}
    assert errors["wrong-path"] == "not-found"
    assert errors["bad-base64"] == "bad-request"
    assert errors["fine"] == "blocked-address"


def test_batch_takes_body_base64(client: FlaskClient) -> None:
    encoded = base64.b64encode(json.dumps({"url": BLOCKED_URL}).encode()).decode()
    [answer] = client.post("/batch", json=[_item("b64", None, body_base64=encoded)]).get_json()
    assert answer["status"] == 200
    assert json.loads(answer["body"])["url"] == BLOCKED_URL


def test_an_empty_batch_is_an_empty_answer(client: FlaskClient) -> None:
    response = client.post("/batch", json=[])
    assert response.status_code == 200
    assert response.get_json() == []


def test_a_full_batch_is_accepted(client: FlaskClient) -> None:
    items = [_item(str(n), {"url": BLOCKED_URL}) for n in range(10)]
    response = client.post("/batch", json=items)
    assert response.status_code == 200
    assert len(response.get_json()) == 10


def test_a_batch_over_the_default_size_is_413(client: FlaskClient, loopback_only) -> None:
    items = [_item(str(n), {"url": BLOCKED_URL}) for n in range(11)]
    response = client.post("/batch", json=items)
    assert response.status_code == 413
    assert response.get_json() == {
        "error": "batch-too-large",
        "message": "batch has 11 items, at most 10 are accepted",
    }


def test_the_batch_size_follows_the_config() -> None:
    client = create_app(FetcherConfig(batch_size=2)).test_client()
    items = [_item(str(n), {"url": BLOCKED_URL}) for n in range(3)]
    assert client.post("/batch", json=items).status_code == 413
    assert client.post("/batch", json=items[:2]).status_code == 200


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"nope", "body must be JSON"),
        (b'{"correlation_id": "a"}', "body must be a JSON array of batch items"),
        (b'["a"]', "item 0 must be a JSON object"),
        (b'[{"path": "/fetch"}]', 'item 0 needs a non-empty string "correlation_id"'),
        (b'[{"correlation_id": 7}]', 'item 0 needs a non-empty string "correlation_id"'),
    ],
)
def test_a_malformed_batch_envelope_is_400(client: FlaskClient, data: bytes, message: str) -> None:
    response = client.post("/batch", data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json() == {"error": "bad-request", "message": message}


def test_an_oversized_request_body_is_json_413(client: FlaskClient) -> None:
    huge = b'{"url": "http://example.com/' + b"a" * (16 * 1024 * 1024) + b'"}'
    response = client.post("/fetch", data=huge, content_type="application/json")
    assert response.status_code == 413
    assert response.get_json()["error"] == "body-too-large"

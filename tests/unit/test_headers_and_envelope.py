import os
import time

import msgpack
import pytest

from proxymq.envelope import (
    CHUNK,
    HEAD,
    TASK_NAME,
    ReplyEnvelope,
    RequestEnvelope,
    StreamPart,
    cancel_headers,
    cancelled_stream,
    decode_reply,
    encode_reply,
    is_cancel_queue,
    new_cancel_queue,
    task_message,
)
from proxymq.headers import end_to_end


def test_hop_by_hop_headers_and_those_named_by_connection_are_dropped():
    headers = [
        ("Connection", "close, X-Private"),
        ("X-Private", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a=1"),
        ("Proxy-Authorization", "x"),
        ("Set-Cookie", "b=2"),
        ("Host", "h"),
    ]
    assert end_to_end(headers, also_drop=("host",)) == [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


def request() -> RequestEnvelope:
    return RequestEnvelope(
        service="svc",
        method="POST",
        path="/a%2Fb",
        query="x=1&x=2",
        headers=[("Content-Type", "application/octet-stream")],
        body=os.urandom(1000),
        deadline=int((time.time() + 30) * 1000),
    )


def test_task_message_is_a_celery_protocol_2_message_carrying_the_envelope():
    original = request()
    body, headers, properties = task_message(original, "cid-1", "reply-q")
    assert headers["task"] == TASK_NAME
    assert headers["id"] == "cid-1"
    assert properties["correlation_id"] == "cid-1"
    assert properties["reply_to"] == "reply-q"
    assert properties["content_type"] == "application/x-msgpack"
    assert 29_000 < int(properties["expiration"]) <= 30_000
    args, kwargs, embed = msgpack.unpackb(body, raw=False)
    assert kwargs == {} and set(embed) == {"callbacks", "errbacks", "chain", "chord"}
    assert RequestEnvelope.from_wire(args[0]) == original


def test_malformed_request_envelope_raises_value_error():
    with pytest.raises(ValueError):
        RequestEnvelope.from_wire({"service": "x"})


def test_reply_round_trips_binary_bodies_and_repeated_headers():
    reply = ReplyEnvelope(200, [("Set-Cookie", "a"), ("Set-Cookie", "b")], bytes(range(256)))
    assert decode_reply(encode_reply(reply)) == reply
    failure = ReplyEnvelope(502, error="downstream-unavailable", message="refused")
    assert decode_reply(encode_reply(failure)) == failure


def test_garbage_reply_raises_value_error():
    with pytest.raises(ValueError):
        decode_reply(b"\xc1not msgpack")


# -- stream parts and cancels ----------------------------------------------------------------


def test_a_stream_part_round_trips_through_its_headers():
    head = StreamPart(HEAD, "s1", 0, "proxymq.cancel." + "a" * 32)
    chunk = StreamPart(CHUNK, "s1", 7)
    assert StreamPart.of(head.headers()) == head
    assert StreamPart.of(chunk.headers()) == chunk
    assert chunk.headers() == {
        "x-proxymq-stream": "chunk",
        "x-proxymq-stream-id": "s1",
        "x-proxymq-stream-seq": 7,
    }


def test_a_whole_reply_is_no_stream_part():
    assert StreamPart.of(None) is None
    assert StreamPart.of({}) is None
    assert StreamPart.of({"other": 1}) is None


def test_a_part_without_a_number_is_unnumbered_and_one_with_a_bad_number_fits_no_order():
    legacy = {"x-proxymq-stream": "chunk", "x-proxymq-stream-id": "s1"}
    assert StreamPart.of(legacy).seq is None
    for bad in ("1", 1.0, True):
        assert StreamPart.of({**legacy, "x-proxymq-stream-seq": bad}).seq == -1


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        pytest.param(new_cancel_queue(), True, id="a-freshly-made-name"),  # xdist needs fixed ids
        ("proxymq.cancel." + "0" * 32, True),
        ("proxymq.cancel.", False),
        ("proxymq.cancel." + "0" * 31, False),
        ("proxymq.cancel." + "G" * 32, False),
        ("payments_requests", False),
        ("amq.gen-abc", False),
        ("proxymq.cancel." + "0" * 32 + "\n", False),
    ],
)
def test_only_a_cancel_queue_name_is_one(name, ok):
    assert is_cancel_queue(name) is ok


def test_a_cancel_names_its_stream():
    assert cancelled_stream(cancel_headers("s1")) == "s1"
    assert cancelled_stream(None) is None
    assert cancelled_stream({}) is None
    assert cancelled_stream({"x-proxymq-stream-id": ""}) is None
    assert cancelled_stream({"x-proxymq-stream-id": 5}) is None

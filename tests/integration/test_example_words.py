"""The streaming example (examples/words) through the real gateway and worker: each word
reaches the client as its own event, about when the example sends it, and the answer
ends cleanly (the last chunk of a chunked body)."""

from __future__ import annotations

import socket
import time

import pytest
import requests
from support import free_port, unique_service

WORDS = ["streams", "are", "relayed", "part", "by", "part", "through", "the", "reply", "queue"]
DELAY = 0.15


@pytest.fixture(scope="module")
def words(stack):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = stack.run("words", ["gunicorn", "examples.words:app", "-b", f"127.0.0.1:{port}"])
    stack.await_ready(process, lambda: requests.get(url + "/healthz", timeout=1).ok, "words")
    return url


@pytest.fixture(scope="module")
def service(stack, words):
    name = unique_service("words")
    stack.worker(name, words)
    return name


@pytest.fixture(scope="module")
def gateway(stack, service):
    return stack.gateway()


def read_events(url: str, path: str) -> tuple[bytes, bytes, list[tuple[float, bytes]]]:
    """GET on a raw socket: the head, the raw (chunked) body, and each SSE event's data
    with its arrival (seconds since the request was sent)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        started, data, events, seen = time.monotonic(), b"", [], 0
        while chunk := sock.recv(65536):
            data += chunk
            arrived = time.monotonic() - started
            body = data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
            found = [line[6:] for line in dechunk(body).split(b"\n") if line.startswith(b"data: ")]
            events += [(arrived, event) for event in found[seen:]]
            seen = len(found)
    head, body = data.split(b"\r\n\r\n", 1)
    return head, body, events


def dechunk(body: bytes) -> bytes:
    """The complete chunks of a chunked body, joined."""
    out = b""
    while b"\r\n" in body:
        size_line, rest = body.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0 or len(rest) < size + 2:
            break
        out, body = out + rest[:size], rest[size + 2 :]
    return out


def test_the_example_alone_streams_word_by_word(words):
    head, _, events = read_events(words, f"/words?text=a+b+c&delay_ms={DELAY * 1000:.0f}")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert [data for _, data in events] == [b"a", b"b", b"c", b"3"]
    assert events[2][0] - events[0][0] > DELAY  # two waits of DELAY, with room


def test_words_arrive_one_by_one_through_the_gateway_and_end_cleanly(gateway, service):
    text = "+".join(WORDS)
    path = f"/{service}/words?text={text}&delay_ms={DELAY * 1000:.0f}"
    head, body, events = read_events(gateway.url, path)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Type: text/event-stream; charset=utf-8" in head
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert b"X-Correlation-ID: " in head
    # Every word once, in order, then the example's end event; then the last chunk.
    assert [data for _, data in events] == [w.encode() for w in WORDS] + [b"%d" % len(WORDS)]
    assert body.endswith(b"0\r\n\r\n")
    # One by one: the example waits DELAY between words, so the first arrived long before
    # the last was even written (a relay that held the body would hand them over at once),
    # and they came in separate reads, not as one lump. Each gap is not bounded: a loaded
    # machine may stall a word and hand over two in one read; half the span is room.
    arrivals = [seconds for seconds, _ in events[: len(WORDS)]]
    assert arrivals[-1] - arrivals[0] > DELAY * (len(WORDS) - 1) * 0.5, arrivals
    assert len(set(arrivals)) > len(WORDS) // 2, arrivals


def test_a_fast_stream_arrives_whole_and_in_order(gateway, service):
    """No delay: the worker reads several events at once, and publishes many parts in
    one go; they must still arrive all of them, in order, every time."""
    text = " ".join(f"w{i}" for i in range(50))
    for _ in range(5):
        answer = requests.get(
            f"{gateway.url}/{service}/words", params={"text": text, "delay_ms": 0}, timeout=20
        )
        got = [line[6:] for line in answer.text.split("\n") if line.startswith("data: ")]
        assert got == [f"w{i}" for i in range(50)] + ["50"]


def test_a_bad_parameter_is_the_examples_400_passed_through(gateway, service):
    answer = requests.get(f"{gateway.url}/{service}/words?delay_ms=soon", timeout=10)
    assert answer.status_code == 400 and answer.json() == {"error": "delay_ms must be a number"}
    assert answer.headers["Content-Length"] == str(len(answer.content))


def test_the_words_metrics_count_the_streams(gateway, service):
    metrics = requests.get(gateway.url + "/metrics").text
    assert f'proxymq_gateway_stream_first_byte_seconds_count{{service="{service}"}}' in metrics
    assert "proxymq_gateway_streams_inflight 0.0" in metrics

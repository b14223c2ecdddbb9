"""Hostile clients and downstreams, performed for real against a running gateway and
worker: what the client, the downstream and the logs see (issue: hostile input)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests
from stack import free_port, unique_service


@pytest.fixture(scope="module")
def gateway(stack, service, downstream):
    stack.worker(service, downstream.url)
    return stack.gateway()


def raw_exchange(gateway, data: bytes) -> bytes:
    """Send ``data`` as is on a fresh connection; everything the gateway answers."""
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "disguise",
    [
        lambda name: f"%{ord(name[0]):02x}{name[1:]}",  # an escaped first letter
        lambda name: f"{name}%2Fadmin",
        lambda name: f"{name}%2fadmin",
    ],
    ids=["escaped-first-letter", "escaped-slash", "lower-case-escaped-slash"],
)
def test_the_service_is_the_first_segment_as_sent_never_decoded(gateway, service, disguise):
    answer = raw_exchange(
        gateway, f"GET /{disguise(service)}/x HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    )
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 404")
    assert b"X-ProxyMQ-Error: unknown-service" in head


def test_the_downstream_sees_forwarded_headers_and_none_of_the_gateways_own(
    gateway, service, downstream
):
    response = requests.post(
        f"{gateway.url}/{service}/h",
        data=b"x",
        headers={
            "X-Forwarded-For": "203.0.113.9",
            "X-ProxyMQ-Signature": "forged",
            "X-ProxyMQ-Timeout": "30",
            "Host": "api.example",
        },
    )
    (seen,) = downstream.requests_for(response.headers["X-Correlation-ID"])
    names = {name.lower(): value for name, value in seen.headers}
    assert names["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert names["x-forwarded-proto"] == "http"
    assert names["x-forwarded-host"] == "api.example"
    assert "x-proxymq-signature" not in names
    assert "x-proxymq-timeout" not in names


def test_a_malformed_chunked_body_is_400_not_500(gateway, service):
    request = (
        f"POST /{service}/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        "zz\r\nnot a chunk size\r\n0\r\n\r\n"
    ).encode()
    head = raw_exchange(gateway, request).split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 400")
    assert b"X-ProxyMQ-Error: bad-request" in head


class LyingDownstream:
    """A raw-socket downstream whose answer's framing disagrees with itself:
    ``Transfer-Encoding: chunked`` and a ``Content-Length`` larger than the body."""

    BODY = b"y" * 86

    def __init__(self) -> None:
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 120\r\nTransfer-Encoding: chunked\r\n"
                    b"Connection: close\r\n\r\n"
                    + b"%x\r\n" % len(self.BODY)
                    + self.BODY
                    + b"\r\n0\r\n\r\n"
                )


def test_an_answer_whose_framing_disagrees_reaches_the_client_with_its_real_length(stack):
    service = unique_service("framing")
    lying = LyingDownstream()
    stack.worker(service, f"http://127.0.0.1:{lying.port}")
    gateway = stack.gateway()
    # Two requests on one keep-alive connection: the second answer must not be
    # swallowed into the first one's body.
    request = f"GET /{service}/x HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    answer = raw_exchange(gateway, request + request)
    first_head, rest = answer.split(b"\r\n\r\n", 1)
    assert b"Content-Length: 86" in first_head
    assert b"Transfer-Encoding" not in first_head
    assert rest[:86] == LyingDownstream.BODY
    assert rest[86:].startswith(b"HTTP/1.1 200")


def test_an_unreachable_downstream_is_named_without_its_address(stack):
    service = unique_service("secret")
    port = free_port()  # nothing listens there
    stack.worker(service, f"http://127.0.0.1:{port}/internal-base")
    gateway = stack.gateway()
    response = requests.get(f"{gateway.url}/{service}/secret/path?token=abc")
    assert response.status_code == 502
    assert response.headers["X-ProxyMQ-Error"] == "downstream-unavailable"
    text = response.text
    for leak in ("127.0.0.1", str(port), "internal-base", "secret/path", "token"):
        assert leak not in text


def test_a_header_flood_is_cut_off_and_never_stalls_the_process(stack, service):
    gateway = stack.gateway(workers=1)  # the flood and the health checks share a process
    host, port = gateway.url.removeprefix("http://").split(":")
    stop = threading.Event()
    slowest = []

    def check_health() -> None:
        while not stop.is_set():
            started = time.monotonic()
            requests.get(gateway.url + "/healthz", timeout=5).raise_for_status()
            slowest.append(time.monotonic() - started)

    checker = threading.Thread(target=check_health)
    checker.start()
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"GET /{service}/x HTTP/1.1\r\nHost: a\r\n".encode())
            line = b"X-Flood: " + b"f" * 1000 + b"\r\n"
            try:
                for _ in range(8 * 1024):  # 8 MiB of headers
                    sock.sendall(line)
            except OSError:
                pass  # the gateway stopped reading and closed: what it should do
            answer = sock.recv(4096)
    finally:
        stop.set()
        checker.join()
    assert answer.startswith(b"HTTP/1.1 431") or answer == b""
    assert slowest and max(slowest) < 0.5, f"slowest /healthz: {max(slowest):.2f} s"


@pytest.mark.parametrize(
    "path", ["/../admin", "/%2e%2e/%2e%2e/admin", "/..%2f..%2fadmin", "/a/..\\..\\admin"]
)
def test_a_path_climbing_above_the_service_root_is_400(gateway, service, downstream, path):
    before = len(downstream.seen)
    answer = raw_exchange(gateway, f"GET /{service}{path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 400")
    assert b"X-ProxyMQ-Error: bad-request" in head
    assert len(downstream.seen) == before


def test_dot_segments_that_stay_inside_reach_the_downstream_as_sent(gateway, service):
    answer = raw_exchange(
        gateway, f"GET /{service}/a/../b/%2e HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    )
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200")
    assert b"X-Echo-Uri: /a/../b/%2e" in head


@pytest.mark.parametrize("framing", ["bytes", "chunked-bytes"])
def test_an_answer_over_the_response_limit_is_502_and_the_downstream_called_once(
    stack, downstream, framing
):
    service = unique_service("big")
    stack.worker(service, downstream.url, PROXYMQ_MAX_RESPONSE_BYTES="5000")
    gateway = stack.gateway()
    response = requests.get(f"{gateway.url}/{service}/{framing}/30000", timeout=30)
    assert response.status_code == 502
    assert response.headers["X-ProxyMQ-Error"] == "response-too-large"
    assert len(downstream.requests_for(response.headers["X-Correlation-ID"])) == 1
    # At the limit exactly it passes, and the worker's connection is still good.
    fits = requests.get(f"{gateway.url}/{service}/{framing}/5000", timeout=30)
    assert (fits.status_code, len(fits.content)) == (200, 5000)

"""Hostile clients and downstreams, performed for real against a running gateway and
worker: what the client, the downstream and the logs see (issue: hostile input)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import amqp
import kombu
import pytest
import requests
from support import RawServer, broker_user, free_port, unique_service, wait_for

from proxymq.envelope import ReplyEnvelope, encode_reply


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


class LyingDownstream(RawServer):
    """A raw-socket downstream whose answer's framing disagrees with itself:
    ``Transfer-Encoding: chunked`` and a ``Content-Length`` larger than the body."""

    BODY = b"y" * 86

    def answer(self, conn: socket.socket) -> None:
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
    # A process stalled by the flood (its parser rescanning megabytes on every read) keeps
    # /healthz waiting for many seconds; 2 s is room for a loaded machine.
    assert slowest and max(slowest) < 2, f"slowest /healthz: {max(slowest):.2f} s"


@pytest.mark.parametrize(
    "cut", ["X-Big", "\r", "\n\r", "\n"], ids=["in-a-name", "cr", "lf-cr", "lf"]
)
def test_a_head_arriving_in_pieces_cut_anywhere_is_read_whole(gateway, service, downstream, cut):
    # The head is read whole before it is parsed, each piece scanned once where the last
    # scan stopped: the blank line that ends it may be cut across two reads.
    value = "v" * 20000
    head = f"GET /{service}/pieces HTTP/1.1\r\nHost: a\r\nX-Big: {value}\r\n\r\n".encode()
    at = head.index(cut.encode(), 20000 if cut.startswith(("\r", "\n")) else 0) + 1
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (head[:10], head[10:at], head[at:]):  # the request line cut too
            sock.sendall(piece)
            time.sleep(0.05)  # separate reads at the gateway, most likely
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    correlation_id = answer.split(b"X-Correlation-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()
    (seen,) = downstream.requests_for(correlation_id)
    assert dict(seen.headers)["X-Big"] == value


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


def test_an_answer_over_the_response_limit_is_502_and_the_downstream_called_once(stack, downstream):
    service = unique_service("big")
    stack.worker(service, downstream.url, PROXYMQ_MAX_RESPONSE_BYTES="5000")
    gateway = stack.gateway()
    response = requests.get(f"{gateway.url}/{service}/bytes/30000", timeout=30)
    assert response.status_code == 502
    assert response.headers["X-ProxyMQ-Error"] == "response-too-large"
    assert len(downstream.requests_for(response.headers["X-Correlation-ID"])) == 1
    # At the limit exactly it passes, and the worker's connection is still good.
    fits = requests.get(f"{gateway.url}/{service}/bytes/5000", timeout=30)
    assert (fits.status_code, len(fits.content)) == (200, 5000)


def dechunked(body: bytes) -> bytes:
    """The data of a chunked body, as far as it goes (a cut-off one too)."""
    data = b""
    while b"\r\n" in body:
        size, _, body = body.partition(b"\r\n")
        if not int(size, 16) or len(body) < int(size, 16):
            break
        data, body = data + body[: int(size, 16)], body[int(size, 16) + 2 :]
    return data


def test_a_streamed_answer_over_the_response_limit_is_cut_off(stack, downstream):
    # Chunked without a length streams: its status is sent before the limit is reached,
    # so past it the answer is cut off (no last chunk), not turned into a 502.
    service = unique_service("bigstream")
    stack.worker(service, downstream.url, PROXYMQ_MAX_RESPONSE_BYTES="5000")
    gateway = stack.gateway()
    answer = raw_exchange(
        gateway, f"GET /{service}/chunked-bytes/30000 HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    )
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    assert not body.endswith(b"0\r\n\r\n")
    assert len(dechunked(body)) <= 5000
    fits = requests.get(f"{gateway.url}/{service}/chunked-bytes/5000", timeout=30)
    assert (fits.status_code, len(fits.content)) == (200, 5000)


@pytest.fixture
def intruder():
    with broker_user() as user:
        yield user


def forge_replies(url: str, queue: str, user_id: str | None, stop: threading.Event) -> None:
    """Take requests off ``queue`` and answer each with a forged 200."""
    forged = encode_reply(ReplyEnvelope(status=200, body=b"forged"))
    with kombu.Connection(url) as connection:
        channel = connection.default_channel

        def answer(message) -> None:
            extra = {"user_id": user_id} if user_id else {}
            channel.basic_publish(
                amqp.Message(forged, correlation_id=message.properties["correlation_id"], **extra),
                routing_key=message.properties["reply_to"],
            )
            message.ack()

        with kombu.Consumer(channel, [kombu.Queue(queue, no_declare=True)], callbacks=[]) as c:
            c.on_message = answer
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.2)


@pytest.mark.parametrize("claimed", [None, "own-name"], ids=["no-user-id", "own-user-id"])
def test_replies_from_other_broker_users_are_dropped(stack, downstream, intruder, claimed):
    name, url = intruder
    service = unique_service("forged")
    stack.worker(service, downstream.url).stop()  # declares the queue, then leaves it
    trusting = stack.gateway()
    guarded = stack.gateway(PROXYMQ_REPLY_USERS="guest")
    stop = threading.Event()
    user_id = name if claimed else None
    forger = threading.Thread(
        target=forge_replies, args=(url, f"{service}_requests", user_id, stop)
    )
    forger.start()
    try:
        # The attack works where replies are not checked ...
        fooled = requests.get(f"{trusting.url}/{service}/x", timeout=10)
        assert (fooled.status_code, fooled.content) == (200, b"forged")
        # ... and not where they are: the forged reply is dropped, the client waits.
        refused = requests.get(
            f"{guarded.url}/{service}/x", headers={"X-ProxyMQ-Timeout": "2"}, timeout=10
        )
        assert (refused.status_code, refused.headers["X-ProxyMQ-Error"]) == (504, "timeout")
        assert repr(user_id) in guarded.process.log()
    finally:
        stop.set()
        forger.join()
    # The real worker's replies carry its broker user, checked by the broker.
    stack.worker(service, downstream.url)
    real = requests.get(f"{guarded.url}/{service}/x", timeout=10)
    assert (real.status_code, real.headers["X-Echo-Uri"]) == (200, "/x")


def test_the_broker_refuses_a_reply_claiming_another_user(intruder):
    _, url = intruder
    with kombu.Connection(url) as connection:
        channel = connection.channel()
        channel.basic_publish(amqp.Message(b"x", user_id="guest"), routing_key="nowhere")
        with pytest.raises(amqp.exceptions.PreconditionFailed):
            channel.basic_qos(0, 1, False)  # the next round trip reports the refusal


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_that_trickles_in_is_408_after_the_body_timeout(stack, downstream, framing):
    service = unique_service("slowbody")
    stack.worker(service, downstream.url)
    gateway = stack.gateway(PROXYMQ_BODY_TIMEOUT="1")
    host, port = gateway.url.removeprefix("http://").split(":")
    framed = "Content-Length: 100" if framing == "length" else "Transfer-Encoding: chunked"
    before = len(downstream.seen)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /{service}/x HTTP/1.1\r\nHost: a\r\n{framed}\r\n\r\n".encode())
        started = time.monotonic()
        sock.setblocking(False)
        answer = b""
        while not answer and time.monotonic() - started < 8:
            with contextlib.suppress(OSError):
                sock.send(b"1\r\nx\r\n" if framing == "chunked" else b"x")  # a byte at a time
            time.sleep(0.25)
            with contextlib.suppress(BlockingIOError):
                answer = sock.recv(4096)
        took = time.monotonic() - started
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"X-ProxyMQ-Error: body-timeout" in head
    assert 0.9 < took < 3
    assert len(downstream.seen) == before


def test_client_values_are_escaped_in_the_access_log_and_job_ids_never_written(stack, downstream):
    service = unique_service("logs")
    stack.worker(service, downstream.url, PROXYMQ_RESULT_URL="redis://127.0.0.1:6379/0")
    gateway = stack.gateway(
        "--access-logfile",
        "-",
        "--access-logformat",
        '"%(r)s" %(U)s %(q)s "%(a)s"',
        PROXYMQ_RESULT_URL="redis://127.0.0.1:6379/0",
    )
    request = (
        f"GET /{service}/a%0d%0aFORGED-PATH?q=%0d%0aFORGED-QUERY HTTP/1.1\r\nHost: a\r\n"
        'User-Agent: agent" \\ red\r\n\r\n'
    ).encode()
    assert raw_exchange(gateway, request).startswith(b"HTTP/1.1 200")
    accepted = requests.post(
        f"{gateway.url}/{service}/x", headers={"Prefer": "respond-async"}, timeout=10
    )
    job_id = accepted.json()["id"]
    wait_for(
        lambda: requests.get(gateway.url + accepted.headers["Location"]).status_code == 200,
        10,
        "the job",
    )
    wait_for(lambda: "/jobs/" in gateway.process.log(), 5, "the access log")
    log = gateway.process.log()
    assert "a\\r\\nFORGED-PATH" in log  # the decoded path, escaped
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    assert 'agent\\" \\\\ red' in log  # a quote cannot end the field early
    assert job_id not in log


def test_requests_gunicorn_refuses_get_the_gateways_json_error(gateway, service):
    answer = raw_exchange(
        gateway, f"GET /{service}/x HTTP/1.1\r\nHost: a\r\nX-Bad: \x1b[31m\r\n\r\n".encode()
    )
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400")
    assert b"X-ProxyMQ-Error: bad-request" in head
    assert json.loads(body)["error"] == "bad-request"

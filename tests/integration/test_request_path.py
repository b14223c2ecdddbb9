"""The request path end to end: real gunicorn gateway, real Celery worker, real RabbitMQ."""

import base64
import concurrent.futures
import http.client
import os
import signal
import socket
import time

import pytest
import requests
from support import consumers, queue_exists, unique_service, wait_for


@pytest.fixture(scope="module")
def gateway(stack, service, downstream):
    stack.worker(service, downstream.url)
    return stack.gateway(workers=2)


def url(gateway, service, path=""):
    return f"{gateway.url}/{service}{path}"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_reaches_the_downstream_as_sent(gateway, service, downstream, method):
    body = b"" if method == "GET" else f"body of {method}".encode()
    response = requests.request(method, url(gateway, service, "/items/7"), data=body)
    assert response.status_code == 200
    assert response.headers["X-Echo-Method"] == method
    assert response.content == body
    seen = downstream.requests_for(response.headers["X-Correlation-ID"])
    assert [(s.method, s.raw_uri, s.body) for s in seen] == [(method, "/items/7", body)]


def test_head_passes_through_without_a_body(gateway, service, downstream):
    response = requests.head(url(gateway, service, "/thing"))
    assert response.status_code == 200
    assert response.headers["X-Echo-Method"] == "HEAD"
    assert response.content == b""


@pytest.mark.parametrize("status", [201, 204, 301, 404, 418, 500, 503])
def test_downstream_status_is_passed_through_not_treated_as_a_gateway_error(
    gateway, service, status
):
    response = requests.get(url(gateway, service, f"/status/{status}"), allow_redirects=False)
    assert response.status_code == status
    assert "X-ProxyMQ-Error" not in response.headers


def test_headers_pass_both_ways_without_hop_by_hop_ones(gateway, service, downstream):
    response = requests.post(
        url(gateway, service, "/h"),
        data=b"x",
        headers={
            "X-Custom": "value with spaces",
            "Authorization": "Bearer abc",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "hop-by-hop because Connection names it",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "X-Correlation-ID": "spoofed-by-client",
        },
    )
    cid = response.headers["X-Correlation-ID"]
    assert cid != "spoofed-by-client"
    (seen,) = downstream.requests_for(cid)
    names = {name.lower(): value for name, value in seen.headers}
    assert names["x-custom"] == "value with spaces"
    assert names["authorization"] == "Bearer abc"
    for dropped in ("x-drop-me", "keep-alive", "te"):
        assert dropped not in names
    assert names["x-proxymq-delivery-count"] == "1"
    deadline = int(names["x-proxymq-deadline"])
    assert time.time() * 1000 < deadline < (time.time() + 121) * 1000
    # Repeated response headers stay separate lines, in order.
    cookies = [v for k, v in response.raw.headers.items() if k.lower() == "set-cookie"]
    assert cookies == ["first=1", "second=2"]


def raw_get(gateway, target: str) -> http.client.HTTPResponse:
    """GET with the request target exactly as given (requests would re-quote it)."""
    host, port = gateway.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    connection.putrequest("GET", target)
    connection.endheaders()
    return connection.getresponse()


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb/caf%C3%A9/%41?x=1&x=2&name=J%C3%BCrgen&empty=&plus=a+b&pct=%2F&%7E",
        # lower-case escapes stay lower case; an invalid escape re-encodes nothing
        "/x%2ey/%zz/ok%2F?a=%2e%7e&c=%zz",
        "/p?back=%5c&raw=a\\b",
    ],
)
def test_query_and_path_reach_the_downstream_byte_for_byte(gateway, service, target):
    response = raw_get(gateway, f"/{service}{target}")
    assert response.status == 200
    assert response.getheader("X-Echo-Uri") == target


def test_raw_non_ascii_request_line_is_refused_with_400(gateway, service, downstream):
    # HTTP request lines are ASCII; non-ASCII paths must be percent-encoded (see the
    # test above). gunicorn refuses raw UTF-8 before the app or the downstream sees it.
    before = len(downstream.seen)
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        line = f"GET /{service}/caf\u00e9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        sock.sendall(line.encode())
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 400")
    assert len(downstream.seen) == before


def test_one_mib_binary_body_survives_both_ways(gateway, service):
    body = os.urandom(1024 * 1024)
    response = requests.post(
        url(gateway, service, "/binary"),
        data=body,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.content == body


def test_500_concurrent_requests_each_get_their_own_answer(stack, service, gateway, downstream):
    stack.worker(service, downstream.url)  # a second worker on the same queue

    def call(i: int) -> tuple[int, bytes, bytes]:
        body = f"request {i} {os.urandom(8).hex()}".encode()
        response = requests.post(url(gateway, service, f"/n/{i}"), data=body, timeout=60)
        return response.status_code, body, response.content

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(call, range(500)))
    assert [status for status, _, _ in results] == [200] * 500
    assert all(sent == got for _, sent, got in results)


def test_unknown_service_is_404_and_leaves_no_queue_behind(gateway):
    name = unique_service("nosuch")
    response = requests.post(f"{gateway.url}/{name}/x", data=b"hello")
    assert response.status_code == 404
    assert response.headers["X-ProxyMQ-Error"] == "unknown-service"
    assert response.json()["error"] == "unknown-service"
    assert response.json()["correlation_id"] == response.headers["X-Correlation-ID"]
    assert not queue_exists(f"{name}_requests")


@pytest.mark.parametrize("name", ["bad.name", "a" * 65, "healthz", "jobs", "sp%20ace"])
def test_invalid_or_reserved_service_names_are_404(gateway, name):
    response = requests.post(f"{gateway.url}/{name}/x/y")
    assert response.status_code == 404
    assert response.headers["X-ProxyMQ-Error"] == "unknown-service"


def test_body_over_the_limit_is_413(stack, service):
    small = stack.gateway(PROXYMQ_MAX_BODY_BYTES="1000")
    response = requests.post(url(small, service, "/x"), data=b"x" * 1001)
    assert response.status_code == 413
    assert response.headers["X-ProxyMQ-Error"] == "body-too-large"
    assert requests.post(url(small, service, "/x"), data=b"x" * 1000).status_code == 200

    def chunked():
        yield b"x" * 600
        yield b"x" * 600

    response = requests.post(url(small, service, "/x"), data=chunked())
    assert response.status_code == 413


def test_headers_over_the_limit_are_431(gateway, service):
    response = requests.get(url(gateway, service, "/x"), headers={"X-Big": "v" * 33000})
    assert response.status_code == 431
    assert response.headers["X-ProxyMQ-Error"] == "headers-too-large"
    assert response.json()["correlation_id"] == response.headers["X-Correlation-ID"]


def test_one_header_may_use_the_whole_limit(gateway, service, downstream):
    # A large JWT or session cookie: 20 KiB, under PROXYMQ_MAX_HEADER_BYTES (32 KiB).
    token = base64.urlsafe_b64encode(os.urandom(15 * 1024)).decode()
    assert len(token) == 20 * 1024
    response = requests.get(url(gateway, service, "/me"), headers={"Authorization": token})
    assert response.status_code == 200, response.text
    (seen,) = downstream.requests_for(response.headers["X-Correlation-ID"])
    assert dict(seen.headers)["Authorization"] == token


def test_header_fields_over_the_limit_in_total_are_431_with_a_correlation_id(gateway, service):
    headers = {"X-Part-1": "a" * 17000, "X-Part-2": "b" * 17000}  # each fits, both do not
    response = requests.get(url(gateway, service, "/x"), headers=headers)
    assert response.status_code == 431
    assert response.headers["X-ProxyMQ-Error"] == "headers-too-large"
    assert response.json()["correlation_id"] == response.headers["X-Correlation-ID"]


def test_unreachable_downstream_is_502(stack, gateway):
    service = unique_service("down")
    stack.worker(service, "http://127.0.0.1:9")  # nothing listens on the discard port
    response = requests.get(url(gateway, service, "/x"))
    assert response.status_code == 502
    assert response.headers["X-ProxyMQ-Error"] == "downstream-unavailable"


@pytest.mark.parametrize(
    "path", ["/close", "/truncate"], ids=["closing-without-an-answer", "hanging-up-mid-body"]
)
def test_downstream_hanging_up_is_502(gateway, service, path):
    response = requests.get(url(gateway, service, path), timeout=30)
    assert response.status_code == 502
    assert response.headers["X-ProxyMQ-Error"] == "downstream-unavailable"


def test_head_keeps_the_downstreams_content_length(gateway, service):
    response = requests.head(url(gateway, service, "/sized"))
    assert response.status_code == 200
    assert response.headers["Content-Length"] == "1234"
    assert requests.get(url(gateway, service, "/sized")).content == b"s" * 1234


def test_no_reply_within_the_wait_is_504_and_the_late_reply_is_dropped(gateway, service):
    started = time.monotonic()
    response = requests.get(url(gateway, service, "/sleep/3"), headers={"X-ProxyMQ-Timeout": "0.5"})
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.headers["X-ProxyMQ-Error"] == "timeout"
    assert 0.5 <= elapsed < 2.5  # the 3 s answer must not be awaited
    # The worker gives up at the same deadline and replies: let that reply arrive at the
    # gateway, which must drop it (nothing observable marks its arrival).
    time.sleep(1.5)
    ok = requests.post(url(gateway, service, "/after"), data=b"after")
    assert (ok.status_code, ok.content) == (200, b"after")


def test_bad_timeout_header_is_400(gateway, service):
    response = requests.get(url(gateway, service, "/x"), headers={"X-ProxyMQ-Timeout": "soon"})
    assert response.status_code == 400
    assert response.headers["X-ProxyMQ-Error"] == "bad-request"


def test_plain_worker_command_runs_many_downstream_calls_at_once(stack, downstream):
    service = unique_service("conc")
    stack.worker(service, downstream.url)
    gateway = stack.gateway()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(
            pool.map(
                lambda i: requests.get(url(gateway, service, "/sleep/0.5")).status_code, range(20)
            )
        )
    assert statuses == [200] * 20
    assert time.monotonic() - started < 4  # 20 x 0.5 s in series would be 10 s


def test_concurrency_flag_limits_downstream_calls(stack, downstream):
    service = unique_service("serial")
    stack.worker(service, downstream.url, "-c", "1")
    gateway = stack.gateway()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(
            pool.map(
                lambda i: requests.get(url(gateway, service, "/sleep/0.3")).status_code, range(4)
            )
        )
    assert statuses == [200] * 4
    assert time.monotonic() - started >= 1.2


def test_worker_killed_mid_request_loses_nothing(stack, downstream):
    service = unique_service("kill")
    victim = stack.worker(service, downstream.url)
    gateway = stack.gateway()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        futures = [
            pool.submit(
                requests.post,
                url(gateway, service, "/sleep/2"),
                data=f"req {i}".encode(),
                timeout=60,
            )
            for i in range(10)
        ]
        wait_for(
            lambda: sum(s.raw_uri == "/sleep/2" for s in downstream.seen) >= 10,
            10,
            "10 calls in flight at the downstream",
        )
        victim.signal(signal.SIGKILL)
        victim.popen.wait(10)
        stack.worker(service, downstream.url)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 10
    assert sorted(r.content for r in responses) == sorted(f"req {i}".encode() for i in range(10))
    redelivered = [
        dict(s.headers).get("X-Proxymq-Delivery-Count")
        for s in downstream.seen
        if s.raw_uri == "/sleep/2"
    ]
    assert "2" in redelivered
    assert consumers(f"{service}_requests") == 1

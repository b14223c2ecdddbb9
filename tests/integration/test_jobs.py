"""Asynchronous jobs through real RabbitMQ and Redis: 202 now, the answer later."""

import hashlib
import hmac
import json
import re
import signal
import socket
import time

import kombu
import pytest
import redis
import requests
from support import (
    BROKER_URL,
    RawServer,
    TaskEventsTap,
    free_port,
    poll_until_done,
    unique_service,
    wait_for,
)

RESULT_URL = "redis://127.0.0.1:6379/0"
ASYNC = {"Prefer": "respond-async"}


@pytest.fixture(scope="module")
def gateway(stack):
    return stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)


def worker(stack, service, downstream, *extra, **env):
    env.setdefault("PROXYMQ_RESULT_URL", RESULT_URL)
    return stack.worker(service, downstream.url, *extra, **env)


def submit(gateway, service, path, body=b"job", **headers):
    response = requests.post(
        f"{gateway.url}/{service}{path}", data=body, headers={**ASYNC, **headers}
    )
    assert response.status_code == 202, response.text
    return response


def test_without_a_result_store_respond_async_is_501(stack, downstream):
    service = unique_service("nostore")
    worker(stack, service, downstream)
    gateway = stack.gateway()
    response = requests.post(f"{gateway.url}/{service}/x", headers=ASYNC)
    assert response.status_code == 501
    assert response.headers["X-ProxyMQ-Error"] == "async-unavailable"


def test_job_answers_202_then_exactly_what_the_synchronous_call_gives(stack, gateway, downstream):
    service = unique_service("job")
    worker(stack, service, downstream)
    accepted = submit(gateway, service, "/sleep/0.5", b"payload")
    job_id = accepted.json()["id"]
    assert accepted.headers["Location"] == f"/jobs/{job_id}"
    assert accepted.json()["status"] == "queued"
    pending = requests.get(gateway.url + accepted.headers["Location"])
    assert pending.status_code == 202
    assert pending.json()["status"] in ("queued", "running")
    answer = poll_until_done(gateway, accepted.headers["Location"])
    assert (answer.status_code, answer.content) == (200, b"payload")
    assert answer.headers["X-Echo-Method"] == "POST"
    correlation_id = accepted.headers["X-Correlation-ID"]
    assert answer.headers["X-Correlation-ID"] == correlation_id
    assert len(downstream.requests_for(correlation_id)) == 1
    synchronous = requests.post(f"{gateway.url}/{service}/sleep/0.5", data=b"payload")
    assert synchronous.content == answer.content
    assert synchronous.headers["Set-Cookie"] == answer.headers["Set-Cookie"]


def test_failed_job_answers_the_gateway_error(stack, gateway):
    service = unique_service("jobfail")
    stack.worker(service, "http://127.0.0.1:9", PROXYMQ_RESULT_URL=RESULT_URL)
    accepted = submit(gateway, service, "/x")
    answer = poll_until_done(gateway, accepted.headers["Location"])
    assert answer.status_code == 502
    assert answer.headers["X-ProxyMQ-Error"] == "downstream-unavailable"


def test_unknown_job_and_unknown_service_are_404(stack, gateway):
    response = requests.get(f"{gateway.url}/jobs/not-a-job")
    assert (response.status_code, response.headers["X-ProxyMQ-Error"]) == (404, "unknown-job")
    response = requests.post(f"{gateway.url}/{unique_service()}/x", headers=ASYNC)
    assert (response.status_code, response.headers["X-ProxyMQ-Error"]) == (404, "unknown-service")


def test_only_the_submitter_can_read_or_cancel_and_redis_holds_no_secret(
    stack, gateway, downstream
):
    service = unique_service("owner")
    worker(stack, service, downstream)
    accepted = submit(gateway, service, "/x", Authorization="Bearer alice-secret")
    location = accepted.headers["Location"]
    correlation_id = accepted.headers["X-Correlation-ID"]
    for headers in ({}, {"Authorization": "Bearer mallory"}):
        assert requests.get(gateway.url + location, headers=headers).status_code == 404
        assert requests.delete(gateway.url + location, headers=headers).status_code == 404
    answer = poll_until_done(gateway, location, Authorization="Bearer alice-secret")
    assert answer.status_code == 200
    stored = redis.Redis.from_url(RESULT_URL).hgetall(f"proxymq:job:{correlation_id}")
    assert b"alice-secret" not in b"".join(stored.values())
    assert stored[b"owner"] == hashlib.sha256(b"Bearer alice-secret").hexdigest().encode()


def test_cancelled_queued_job_never_reaches_the_downstream(stack, gateway, downstream):
    service = unique_service("cancel")
    worker(stack, service, downstream).stop()  # the queue exists, nobody consumes it
    accepted = submit(gateway, service, "/x", b"never")
    location = accepted.headers["Location"]
    assert requests.delete(gateway.url + location).status_code == 204
    assert requests.get(gateway.url + location).status_code == 404
    worker(stack, service, downstream)
    after = submit(gateway, service, "/y", b"later")
    assert poll_until_done(gateway, after.headers["Location"]).content == b"later"
    assert downstream.requests_for(accepted.headers["X-Correlation-ID"]) == []


def test_finished_job_can_be_forgotten(stack, gateway, downstream):
    service = unique_service("forget")
    worker(stack, service, downstream)
    location = submit(gateway, service, "/x").headers["Location"]
    assert poll_until_done(gateway, location).status_code == 200
    assert requests.delete(gateway.url + location).status_code == 204
    assert requests.get(gateway.url + location).status_code == 404


def test_job_survives_a_gateway_restart_and_a_worker_crash(stack, downstream):
    service = unique_service("durable")
    worker(stack, service, downstream).stop()
    first = stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)
    accepted = submit(first, service, "/sleep/2", b"durable")
    first.process.stop()
    victim = worker(stack, service, downstream)
    correlation_id = accepted.headers["X-Correlation-ID"]
    wait_for(lambda: downstream.requests_for(correlation_id), 20, "the job to start")
    victim.signal(signal.SIGKILL)
    victim.popen.wait(10)
    worker(stack, service, downstream)
    second = stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)
    answer = poll_until_done(second, accepted.headers["Location"])
    assert (answer.status_code, answer.content) == (200, b"durable")
    assert len(downstream.requests_for(correlation_id)) == 2  # at least once: it ran again


def test_job_past_its_deadline_is_504(stack, downstream):
    service = unique_service("jobdeadline")
    worker(stack, service, downstream).stop()
    gateway = stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL, PROXYMQ_JOB_TIMEOUT="1")
    location = submit(gateway, service, "/x").headers["Location"]
    time.sleep(1.2)
    answer = requests.get(gateway.url + location)
    assert (answer.status_code, answer.headers["X-ProxyMQ-Error"]) == (504, "timeout")


def test_callback_is_posted_signed_and_guarded(stack, gateway, downstream):
    service = unique_service("callback")
    worker(
        stack,
        service,
        downstream,
        PROXYMQ_CALLBACK_SECRET="s3cret",
        PROXYMQ_CALLBACK_ALLOW_PRIVATE="true",
    )
    callback = downstream.url + "/callback/ok"
    accepted = submit(gateway, service, "/x", b"called back", **{"X-ProxyMQ-Callback": callback})
    correlation_id = accepted.headers["X-Correlation-ID"]
    wait_for(lambda: any(s.raw_uri == "/callback/ok" for s in downstream.seen), 20, "callback")
    (posted,) = [s for s in downstream.seen if s.raw_uri == "/callback/ok"]
    headers = dict(posted.headers)
    # t=<unix seconds>,v1=<HMAC of "t.body">: the time is signed, so it can be checked.
    timestamp, signed = re.fullmatch(
        r"t=(\d+),v1=([0-9a-f]{64})", headers["X-Proxymq-Signature"]
    ).groups()
    assert abs(int(timestamp) - time.time()) < 30
    expected = hmac.new(b"s3cret", f"{timestamp}.".encode() + posted.body, hashlib.sha256)
    assert signed == expected.hexdigest()
    body = json.loads(posted.body)
    assert (body["correlation_id"], body["status"], body["body"]) == (
        correlation_id,
        200,
        "called back",
    )
    assert accepted.json()["id"] not in posted.body.decode() + str(posted.headers)

    guarded = unique_service("guarded")
    guarded_worker = worker(stack, guarded, downstream, PROXYMQ_CALLBACK_SECRET="s3cret")
    blocked = downstream.url + "/callback/blocked"
    location = submit(gateway, guarded, "/x", **{"X-ProxyMQ-Callback": blocked}).headers["Location"]
    assert poll_until_done(gateway, location).status_code == 200
    wait_for(lambda: "BlockedAddressError" in guarded_worker.log(), 10, "callback refused")
    assert not any(s.raw_uri == "/callback/blocked" for s in downstream.seen)


def test_bad_callback_url_is_400(gateway):
    response = requests.post(
        f"{gateway.url}/{unique_service()}/x",
        headers={**ASYNC, "X-ProxyMQ-Callback": "file:///etc/passwd"},
    )
    assert (response.status_code, response.headers["X-ProxyMQ-Error"]) == (400, "bad-request")


def test_a_job_answer_over_the_response_limit_is_stored_as_502(stack, gateway, downstream):
    service = unique_service("jobbig")
    worker(stack, service, downstream, PROXYMQ_MAX_RESPONSE_BYTES="1000")
    location = submit(gateway, service, "/bytes/5000").headers["Location"]
    answer = poll_until_done(gateway, location)
    assert (answer.status_code, answer.headers["X-ProxyMQ-Error"]) == (502, "response-too-large")


class CallbackReceiver(RawServer):
    """A raw-socket callback receiver that misbehaves: ``trickle`` answers one byte a
    second for ever, ``redirect`` answers 307 to another URL. Records when each
    connection was accepted and when the worker gave up on it."""

    def __init__(self, behaviour: str, redirect_to: str = "") -> None:
        self.behaviour, self.redirect_to = behaviour, redirect_to
        self.connections: list[list[float]] = []  # [accepted, closed by the worker]
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def answer(self, conn: socket.socket) -> None:
        times = [time.monotonic()]
        self.connections.append(times)
        with conn:
            conn.recv(65536)
            try:
                if self.behaviour == "redirect":
                    conn.sendall(
                        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: "
                        + self.redirect_to.encode()
                        + b"\r\nContent-Length: 0\r\n\r\n"
                    )
                    conn.recv(1)
                else:
                    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 1000:
                        conn.sendall(bytes([byte]))
                        time.sleep(1)
            except OSError:
                pass
        times.append(time.monotonic())


def test_a_trickling_callback_receiver_holds_no_request_and_is_cut_off(stack, gateway, downstream):
    service = unique_service("trickle")
    receiver = CallbackReceiver("trickle")
    worker(stack, service, downstream, "-c", "1", PROXYMQ_CALLBACK_ALLOW_PRIVATE="true")
    location = submit(gateway, service, "/x", **{"X-ProxyMQ-Callback": receiver.url}).headers[
        "Location"
    ]
    assert poll_until_done(gateway, location).status_code == 200
    wait_for(lambda: receiver.connections, 10, "the callback")
    # The worker's one call thread is free while the receiver trickles.
    started = time.monotonic()
    response = requests.post(f"{gateway.url}/{service}/y", data=b"next", timeout=10)
    assert (response.status_code, response.content) == (200, b"next")
    assert time.monotonic() - started < 3
    # Each attempt is cut off at its total deadline (10 s), not one read timeout per byte.
    wait_for(lambda: len(receiver.connections[0]) == 2, 20, "the worker to give up")
    accepted, closed = receiver.connections[0]
    assert 9 < closed - accepted < 13


def test_a_callback_redirect_is_not_followed(stack, gateway, downstream):
    service = unique_service("redirect")
    stolen = downstream.url + "/callback/stolen"
    receiver = CallbackReceiver("redirect", redirect_to=stolen)
    victim = worker(
        stack,
        service,
        downstream,
        PROXYMQ_CALLBACK_SECRET="s3cret",
        PROXYMQ_CALLBACK_ALLOW_PRIVATE="true",
        PROXYMQ_CALLBACK_RETRIES="2",
        PROXYMQ_CALLBACK_DELAY_SCALE="0.1",  # retries after 0.5 s and 3 s
    )
    location = submit(gateway, service, "/x", **{"X-ProxyMQ-Callback": receiver.url}).headers[
        "Location"
    ]
    assert poll_until_done(gateway, location).status_code == 200
    # All three attempts end at the 307 (a followed redirect would have been a 2xx).
    wait_for(lambda: victim.log().count("HTTP 307") == 3, 15, "three refused redirects")
    assert len(receiver.connections) == 3
    assert not any(s.raw_uri == "/callback/stolen" for s in downstream.seen)


def test_a_callback_url_s_credentials_and_query_never_reach_the_log(stack, gateway, downstream):
    service = unique_service("cblog")
    victim = worker(
        stack,
        service,
        downstream,
        PROXYMQ_CALLBACK_ALLOW_PRIVATE="true",
        PROXYMQ_CALLBACK_DELAY_SCALE="0.1",  # retries after 0.5 s and 3 s
    )
    closed = free_port()  # nothing listens: every attempt fails and is logged
    url = f"http://user:hunter2@127.0.0.1:{closed}/hook%0d%0aFORGED?token=abc"
    location = submit(gateway, service, "/x", **{"X-ProxyMQ-Callback": url}).headers["Location"]
    assert poll_until_done(gateway, location).status_code == 200
    wait_for(lambda: victim.log().count("callback") >= 3, 15, "three failed attempts")
    log = victim.log()
    assert "hunter2" not in log and "token=abc" not in log
    assert not any(line.startswith("FORGED") for line in log.splitlines())


def test_the_job_id_is_a_secret_of_its_own_seen_only_in_the_202(stack, gateway, downstream):
    service = unique_service("secret")
    victim = worker(stack, service, downstream)
    with kombu.Connection(BROKER_URL) as connection:
        tap = TaskEventsTap(connection)
        accepted = submit(gateway, service, "/x", b"quiet")
        job_id, correlation_id = accepted.json()["id"], accepted.headers["X-Correlation-ID"]
        assert job_id != correlation_id and len(job_id) >= 32
        assert poll_until_done(gateway, accepted.headers["Location"]).content == b"quiet"
        events: list = []
        wait_for(
            lambda: events.extend(tap.bunches()) or "task-succeeded" in str(events),
            10,
            "the job's task events",
        )
    (seen,) = downstream.requests_for(correlation_id)
    assert job_id not in str(seen)
    assert correlation_id in str(events) and job_id not in str(events)
    assert job_id not in victim.log() and job_id not in gateway.process.log()
    keys = redis.Redis.from_url(RESULT_URL).keys("proxymq:*")
    assert not any(job_id.encode() in key for key in keys)

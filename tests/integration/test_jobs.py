"""Asynchronous jobs through real RabbitMQ and Redis: 202 now, the answer later."""

import hashlib
import hmac
import json
import signal
import time

import pytest
import redis
import requests
from stack import unique_service, wait_for

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


def poll_until_done(gateway, location, timeout=30, **headers):
    answers = []

    def done():
        answers.append(requests.get(gateway.url + location, headers=headers))
        return answers[-1].status_code != 202

    wait_for(done, timeout, f"job {location}", interval=0.1)
    return answers[-1]


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
    assert answer.headers["X-Correlation-ID"] == job_id
    assert len(downstream.requests_for(job_id)) == 1
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
    job_id = accepted.json()["id"]
    for headers in ({}, {"Authorization": "Bearer mallory"}):
        assert requests.get(gateway.url + location, headers=headers).status_code == 404
        assert requests.delete(gateway.url + location, headers=headers).status_code == 404
    answer = poll_until_done(gateway, location, Authorization="Bearer alice-secret")
    assert answer.status_code == 200
    stored = redis.Redis.from_url(RESULT_URL).hgetall(f"proxymq:job:{job_id}")
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
    assert downstream.requests_for(accepted.json()["id"]) == []


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
    job_id = accepted.json()["id"]
    wait_for(lambda: downstream.requests_for(job_id), 20, "the job to start")
    victim.signal(signal.SIGKILL)
    victim.popen.wait(10)
    worker(stack, service, downstream)
    second = stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)
    answer = poll_until_done(second, accepted.headers["Location"])
    assert (answer.status_code, answer.content) == (200, b"durable")
    assert len(downstream.requests_for(job_id)) == 2  # at least once: it ran again


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
    job_id = accepted.json()["id"]
    wait_for(lambda: any(s.raw_uri == "/callback/ok" for s in downstream.seen), 20, "callback")
    (posted,) = [s for s in downstream.seen if s.raw_uri == "/callback/ok"]
    headers = dict(posted.headers)
    expected = hmac.new(b"s3cret", posted.body, hashlib.sha256).hexdigest()
    assert headers["X-Proxymq-Signature"] == f"sha256={expected}"
    body = json.loads(posted.body)
    assert (body["id"], body["status"], body["body"]) == (job_id, 200, "called back")

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

"""The client's controls through real gunicorn, Celery, RabbitMQ and Redis:
``Idempotency-Key``, ``Prefer: respond-async, wait=<s>``, ``X-ProxyMQ-Priority``."""

import contextlib
import itertools
import json
import select
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support import RawServer, Scrape, consumers, free_port, unique_service, wait_for
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

RESULT_URL = "redis://127.0.0.1:6379/0"
# gateway.idempotency.LEASE_MARGIN (importing the gateway here would build its app): a
# claim's first lease is the request's wait plus this.
LEASE_MARGIN = 10


@pytest.fixture(scope="module")
def gateway(stack):
    return stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL, PROXYMQ_MAX_CLIENT_PRIORITY="9")


@pytest.fixture(scope="module")
def served(stack, downstream):
    """One synchronous service shared by the idempotency tests."""
    service = unique_service("idem")
    stack.worker(service, downstream.url)
    return service


def key() -> str:
    return f"key-{uuid.uuid4()}"


def calls_with(downstream, body: bytes) -> list:
    return [seen for seen in list(downstream.seen) if seen.body == body]


def post(gateway, service, path, body, timeout=30, **headers):
    return requests.post(
        f"{gateway.url}/{service}{path}", data=body, headers=headers, timeout=timeout
    )


# -- Idempotency-Key -------------------------------------------------------------------


def test_a_repeat_gets_the_first_answer_without_a_second_call(gateway, served, downstream):
    body, idem = uuid.uuid4().bytes, key()
    first = post(gateway, served, "/x?a=1", body, **{"Idempotency-Key": idem})
    again = post(gateway, served, "/x?a=1", body, **{"Idempotency-Key": idem})
    assert (first.status_code, first.content) == (200, body)
    assert "Idempotent-Replayed" not in first.headers
    assert (again.status_code, again.content) == (200, body)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["X-Correlation-ID"] == first.headers["X-Correlation-ID"]
    assert again.headers["X-Echo-Uri"] == first.headers["X-Echo-Uri"]
    assert len(calls_with(downstream, body)) == 1


def test_the_key_used_for_another_request_is_422(gateway, served, downstream):
    body, idem = uuid.uuid4().bytes, key()
    assert post(gateway, served, "/x", body, **{"Idempotency-Key": idem}).status_code == 200
    others = [
        post(gateway, served, "/x", body + b"!", **{"Idempotency-Key": idem}),
        post(gateway, served, "/y", body, **{"Idempotency-Key": idem}),
        post(gateway, served, "/x?q", body, **{"Idempotency-Key": idem}),
        requests.put(f"{gateway.url}/{served}/x", data=body, headers={"Idempotency-Key": idem}),
    ]
    for response in others:
        assert response.status_code == 422, response.text
        assert response.headers["X-ProxyMQ-Error"] == "idempotency-key-reused"
    assert len(calls_with(downstream, body)) == 1
    assert not calls_with(downstream, body + b"!")


def test_keys_are_scoped_per_submitter(gateway, served, downstream):
    body, idem = uuid.uuid4().bytes, key()
    for who in ("Bearer alice", "Bearer bob", "Bearer alice"):
        response = post(
            gateway, served, "/x", body, **{"Idempotency-Key": idem, "Authorization": who}
        )
        assert response.status_code == 200
    assert len(calls_with(downstream, body)) == 2


def whoami(gateway, service, idem, **headers):
    headers["Idempotency-Key"] = idem
    return requests.get(f"{gateway.url}/{service}/whoami", headers=headers, timeout=30)


def calls_keyed(downstream, idem: str) -> list:
    return [s for s in list(downstream.seen) if dict(s.headers).get("Idempotency-Key") == idem]


def test_a_key_never_replays_to_a_client_without_the_same_credentials(gateway, served, downstream):
    idem = key()
    first = whoami(gateway, served, idem, Cookie="sid=A")
    assert first.status_code == 200 and first.json()["Cookie"] == "sid=A"
    others = {
        "no credential": {},
        "another cookie": {"Cookie": "sid=B"},
        "an Authorization": {"Authorization": "Bearer b"},
        "A's cookie and an Authorization": {"Cookie": "sid=A", "Authorization": "Bearer b"},
    }
    for who, headers in others.items():
        answer = whoami(gateway, served, idem, **headers)
        assert answer.status_code == 200, (who, answer.text)
        assert "Idempotent-Replayed" not in answer.headers, who
        assert answer.json() == {"Cookie": None, "Authorization": None, **headers}, who
        assert answer.headers["Set-Cookie"] != first.headers["Set-Cookie"], who
    again = whoami(gateway, served, idem, Cookie="sid=A")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert again.headers["Set-Cookie"] == first.headers["Set-Cookie"]
    assert len(calls_keyed(downstream, idem)) == 1 + len(others)


def test_an_anonymous_replay_never_carries_the_first_answers_set_cookie(
    gateway, served, downstream
):
    idem = key()
    first = whoami(gateway, served, idem)
    assert first.status_code == 200 and first.headers["Set-Cookie"].startswith("session=")
    again = whoami(gateway, served, idem)
    assert (again.status_code, again.content) == (200, first.content)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Set-Cookie" not in again.headers
    assert len(calls_keyed(downstream, idem)) == 1


ASYNC = {"Prefer": "respond-async"}
SID = {"Cookie": "sid=A"}


@pytest.mark.parametrize(
    ("first_sent", "repeat_sent", "refused"),
    [
        (ASYNC, ASYNC, True),
        (ASYNC, {}, True),
        (ASYNC, {"Prefer": "respond-async, wait=5"}, True),
        ({**ASYNC, **SID}, ASYNC, False),
        (ASYNC, {**ASYNC, **SID}, False),
    ],
    ids=["async-repeat", "sync-repeat", "waiting-repeat", "cookie-first", "cookie-repeat"],
)
def test_an_anonymous_repeat_of_a_job_never_names_the_job(
    gateway, jobs_service, downstream, first_sent, repeat_sent, refused
):
    """An anonymous job is read by whoever holds its id, and every anonymous client
    shares one scope: a replay would hand the id (and so the answer) to anyone who
    sends the same key. The repeat is refused instead; a cookie on one side makes it
    another submitter's request, a job of its own."""
    body, idem = uuid.uuid4().bytes, key()
    first = post(gateway, jobs_service, "/x", body, **{**first_sent, "Idempotency-Key": idem})
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    wait_for(lambda: requests.get(gateway.url + first.headers["Location"]).status_code == 200,
             10, "the first job")  # fmt: skip
    repeat = post(gateway, jobs_service, "/x", body, **{**repeat_sent, "Idempotency-Key": idem})
    named = job_id in repeat.text or any(job_id in value for value in repeat.headers.values())
    assert not named and body not in repeat.content
    if refused:
        assert repeat.status_code == 409, repeat.text
        assert repeat.headers["X-ProxyMQ-Error"] == "anonymous-job-replay"
        assert "Idempotent-Replayed" not in repeat.headers
        assert len(calls_with(downstream, body)) == 1  # refused, not submitted again
    else:
        assert repeat.status_code == 202 and "Idempotent-Replayed" not in repeat.headers


@pytest.mark.parametrize(
    "empty",
    [{"Authorization": ""}, {"Cookie": ""}, {"Authorization": "", "Cookie": ""}],
    ids=["authorization", "cookie", "both"],
)
def test_an_empty_credential_or_cookie_is_no_credential(gateway, served, jobs_service, empty):
    """A header sent empty names nobody: were it a scope of its own, every client
    sending it would share that scope and get each other's Set-Cookie and jobs."""
    idem = key()
    first = whoami(gateway, served, idem, **empty)
    assert first.status_code == 200 and first.headers["Set-Cookie"].startswith("session=")
    for sent in (empty, {}):  # the same as sending none: one anonymous scope
        again = whoami(gateway, served, idem, **sent)
        assert again.headers.get("Idempotent-Replayed") == "true", sent
        assert again.content == first.content and "Set-Cookie" not in again.headers, sent
    body, idem = uuid.uuid4().bytes, key()
    headers = {**empty, **ASYNC, "Idempotency-Key": idem}
    job = post(gateway, jobs_service, "/x", body, **headers)
    assert job.status_code == 202
    repeat = post(gateway, jobs_service, "/x", body, **headers)
    assert repeat.status_code == 409 and job.json()["id"] not in repeat.text


def test_a_malformed_key_is_400(gateway, served):
    response = post(gateway, served, "/x", b"", **{"Idempotency-Key": "é" * 3})
    assert (response.status_code, response.headers["X-ProxyMQ-Error"]) == (400, "bad-request")


def test_concurrent_repeats_wait_for_the_first_and_share_its_one_call(gateway, served, downstream):
    body, idem = uuid.uuid4().bytes, key()
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda _: post(gateway, served, "/sleep/1", body, **{"Idempotency-Key": idem}),
                range(8),
            )
        )
    assert [a.status_code for a in answers] == [200] * 8
    assert {a.content for a in answers} == {body}
    assert len({a.headers["X-Correlation-ID"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 7
    assert len(calls_with(downstream, body)) == 1
    text = requests.get(gateway.url + "/metrics").text
    assert f'proxymq_gateway_idempotent_waits_total{{service="{served}"}}' in text
    assert f'proxymq_gateway_idempotent_replays_total{{service="{served}"}}' in text


def test_the_clients_retry_after_its_own_timeout_waits_for_the_running_call(
    gateway, served, downstream
):
    body, idem = uuid.uuid4().bytes, key()
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(gateway, served, "/sleep/2", body, timeout=0.5, **{"Idempotency-Key": idem})
    retry = post(gateway, served, "/sleep/2", body, **{"Idempotency-Key": idem})
    assert (retry.status_code, retry.content) == (200, body)
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert len(calls_with(downstream, body)) == 1


class SlowDownstream(RawServer):
    """A downstream whose calls take their time, each recorded with its
    ``Idempotency-Key`` and when it started and ended (its answer sent, or its connection
    closed by the worker, noticed at once). ``/stream/<s>``: an event stream of ``s``
    seconds, an event every 0.2 s. ``/trickle/<n>``: ``n`` bytes with a Content-Length,
    one every 0.1 s (every read the worker makes gets a byte, so only a whole-call
    deadline cuts it short)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        head = conn.recv(65536).decode("latin-1")
        lines = head.split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        call = {"key": headers.get("idempotency-key"), "started": time.monotonic(), "ended": None}
        self.calls.append(call)
        _, kind, amount = lines[0].split(" ")[1].split("/")
        try:
            if kind == "stream":
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                )
                end = time.monotonic() + float(amount)
                while time.monotonic() < end:
                    conn.sendall(b"6\r\ndata\n\n\r\n")
                    self._pause(conn, 0.2)
                conn.sendall(b"0\r\n\r\n")
            else:
                size = int(amount)
                conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n")
                conn.sendall(b"Content-Length: %d\r\n\r\n" % size)
                for _ in range(size):
                    self._pause(conn, 0.1)
                    conn.sendall(b"t")
        except OSError:
            pass
        call["ended"] = time.monotonic()
        conn.close()

    @staticmethod
    def _pause(conn: socket.socket, seconds: float) -> None:
        """Wait, but end the call the moment the worker closes its connection."""
        if select.select([conn], [], [], seconds)[0] and not conn.recv(1, socket.MSG_PEEK):
            raise ConnectionResetError("closed by the worker")

    def keyed(self, idem: str) -> list[dict]:
        return [call for call in list(self.calls) if call["key"] == idem]


@pytest.fixture(scope="module")
def slow(stack):
    server = SlowDownstream()
    service = unique_service("idemslow")
    stack.worker(service, server.url, "-c", "2")
    yield server, service
    server.close()


def test_a_stream_longer_than_its_claims_lease_keeps_its_key_while_it_runs(gateway, slow):
    server, service = slow
    idem = key()
    url = f"{gateway.url}/{service}/stream/{LEASE_MARGIN + 5}"
    # A wait of 1 s: the claim's lease is 1 s + LEASE_MARGIN, which the stream outlives.
    headers = {"Idempotency-Key": idem, "X-ProxyMQ-Timeout": "1"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(requests.get, url, headers=headers, timeout=60)
        wait_for(lambda: server.keyed(idem), 10, "the stream's call")
        time.sleep(LEASE_MARGIN + 1.5)  # past the lease it was first given
        with requests.get(url, headers=headers, stream=True, timeout=60) as repeat:
            # It waits for the running stream (1 s, its own wait), and calls nothing.
            assert repeat.status_code == 504, repeat.headers
            assert repeat.headers["X-ProxyMQ-Error"] == "timeout"
        assert len(server.keyed(idem)) == 1
        assert first.result().status_code == 200
        assert first.result().content.count(b"data") > 5 * (LEASE_MARGIN + 4)
    assert len(server.keyed(idem)) == 1
    # A stream is relayed, not kept: once it ended, its key is free again.
    again = requests.get(url, headers={"Idempotency-Key": idem}, stream=True, timeout=60)
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    again.close()


def test_a_504_keeps_the_key_until_the_first_call_is_over(gateway, slow):
    server, service = slow
    idem = key()
    url = f"{gateway.url}/{service}/trickle/30"  # 3 s of answer
    headers = {"Idempotency-Key": idem, "X-ProxyMQ-Timeout": "1"}
    first = requests.get(url, headers=headers, timeout=30)
    assert first.status_code == 504 and first.headers["X-ProxyMQ-Error"] == "timeout"
    repeat = requests.get(url, headers={"Idempotency-Key": idem}, timeout=60)
    assert (repeat.status_code, repeat.content) == (200, b"t" * 30), repeat.text
    calls = server.keyed(idem)
    # Never a second call while the first one runs. (A first call cut off by the worker
    # ends when the downstream's thread sees its connection closed: a few ms of thread
    # scheduling are allowed for, far below the 2 s an overlapping call would show.)
    for earlier, later in itertools.pairwise(calls):
        assert earlier["ended"] is not None, calls
        assert later["started"] > earlier["ended"] - 0.05, calls
    if len(calls) == 1:  # the first call's answer came after the 504: it is kept
        assert repeat.headers["Idempotent-Replayed"] == "true"
        assert repeat.headers["X-Correlation-ID"] == first.headers["X-Correlation-ID"]
    else:  # the worker cut the first call off at its deadline: the repeat calls anew
        assert len(calls) == 2 and "Idempotent-Replayed" not in repeat.headers


def test_a_worker_killed_mid_call_the_redelivered_call_answers_both(stack, gateway, downstream):
    service = unique_service("idemkill")
    doomed = stack.worker(service, downstream.url)
    body, idem = uuid.uuid4().bytes, key()
    answers = {}

    def send(name):
        answers[name] = post(gateway, service, "/sleep/2", body, **{"Idempotency-Key": idem})

    first = threading.Thread(target=send, args=("first",))
    first.start()
    wait_for(lambda: calls_with(downstream, body), 10, "the first call")
    repeat = threading.Thread(target=send, args=("repeat",))
    repeat.start()
    wait_for(
        lambda: (
            Scrape(gateway.url + "/metrics").value(
                "proxymq_gateway_idempotent_waits_total", service=service
            )
            == 1
        ),
        10,
        "the repeat to wait for the first",
    )
    doomed.kill()
    stack.worker(service, downstream.url)
    first.join(30)
    repeat.join(30)
    assert answers["first"].status_code == 200, answers["first"].text
    assert (answers["repeat"].status_code, answers["repeat"].content) == (200, body)
    assert answers["repeat"].headers["Idempotent-Replayed"] == "true"
    seen = calls_with(downstream, body)
    # The killed call, and its redelivery; the repeat made none of its own.
    assert len(seen) == 2
    correlation = {dict(s.headers)["X-Correlation-Id"] for s in seen}
    assert correlation == {answers["first"].headers["X-Correlation-ID"]}
    assert sorted(dict(s.headers)["X-Proxymq-Delivery-Count"] for s in seen) == ["1", "2"]


def test_a_workers_error_releases_the_key_for_the_retry(stack, gateway, downstream):
    service = unique_service("idemrel")
    unreachable = stack.worker(service, f"http://127.0.0.1:{free_port()}")
    body, idem = uuid.uuid4().bytes, key()
    failed = post(gateway, service, "/x", body, **{"Idempotency-Key": idem})
    assert failed.headers["X-ProxyMQ-Error"] == "downstream-unavailable"
    unreachable.stop()
    stack.worker(service, downstream.url)
    retry = post(gateway, service, "/x", body, **{"Idempotency-Key": idem})
    assert (retry.status_code, retry.content) == (200, body)
    assert "Idempotent-Replayed" not in retry.headers


def test_a_timeout_no_worker_answers_frees_the_key_only_at_its_leases_end(
    stack, gateway, downstream
):
    service = unique_service("idemlease")
    stack.worker(service, downstream.url).stop()  # the queue exists, nobody consumes it
    body, idem = uuid.uuid4().bytes, key()
    headers = {"Idempotency-Key": idem, "X-ProxyMQ-Timeout": "0.5"}
    sent = time.monotonic()
    assert post(gateway, service, "/x", body, **headers).status_code == 504
    # The worker, started late, drops the expired request unanswered: no late reply.
    stack.worker(service, downstream.url)
    retry = post(gateway, service, "/x", body, **{"Idempotency-Key": idem})
    assert (retry.status_code, retry.content) == (200, body)
    assert "Idempotent-Replayed" not in retry.headers
    assert time.monotonic() - sent > 0.5 + LEASE_MARGIN - 0.5  # it waited out the lease
    assert len(calls_with(downstream, body)) == 1


def test_without_a_result_store_the_key_is_501(stack, served):
    plain = stack.gateway()
    response = post(plain, served, "/x", b"", **{"Idempotency-Key": key()})
    assert response.status_code == 501
    assert response.headers["X-ProxyMQ-Error"] == "idempotency-unavailable"


@contextlib.contextmanager
def private_redis():
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    process = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        wait_for(lambda: redis.Redis(port=port).ping(), 10, "a private redis")
        yield process, f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait(10)


def test_the_result_store_down_is_503_and_never_a_call(stack, downstream):
    service = unique_service("idemdown")
    with private_redis() as (redis_process, url):
        gateway = stack.gateway(PROXYMQ_RESULT_URL=url)
        stack.worker(service, downstream.url, PROXYMQ_RESULT_URL=url)
        body = uuid.uuid4().bytes
        assert post(gateway, service, "/x", body, **{"Idempotency-Key": key()}).status_code == 200
        redis_process.kill()
        redis_process.wait(10)
        lost = uuid.uuid4().bytes
        response = post(gateway, service, "/x", lost, **{"Idempotency-Key": key()})
        assert response.status_code == 503
        assert response.headers["X-ProxyMQ-Error"] == "result-store-unavailable"
        assert "Retry-After" in response.headers
        assert post(gateway, service, "/x", b"no key").status_code == 200
        time.sleep(0.5)
        assert not calls_with(downstream, lost)


def test_a_job_with_a_key_is_submitted_once_and_its_repeat_gets_the_same_job(
    stack, gateway, downstream
):
    service = unique_service("idemjob")
    stack.worker(service, downstream.url, PROXYMQ_RESULT_URL=RESULT_URL)
    body, idem = uuid.uuid4().bytes, key()
    headers = {"Prefer": "respond-async", "Idempotency-Key": idem, "Authorization": "Bearer j"}
    first = post(gateway, service, "/x", body, **headers)
    again = post(gateway, service, "/x", body, **headers)
    assert first.status_code == again.status_code == 202
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    wait_for(lambda: calls_with(downstream, body), 10, "the job's call")
    job = gateway.url + first.headers["Location"]
    owner = {"Authorization": "Bearer j"}
    wait_for(lambda: requests.get(job, headers=owner).status_code == 200, 10, "job")
    done = requests.get(job, headers=owner)
    assert done.content == body
    assert len(calls_with(downstream, body)) == 1


# -- Prefer: respond-async, wait=<s> -----------------------------------------------------


@pytest.fixture(scope="module")
def jobs_service(stack, downstream):
    service = unique_service("wait")
    stack.worker(service, downstream.url, PROXYMQ_RESULT_URL=RESULT_URL)
    return service


def test_wait_gives_the_answer_itself_when_it_is_ready_in_time(gateway, jobs_service):
    body = uuid.uuid4().bytes
    started = time.monotonic()
    response = post(gateway, jobs_service, "/sleep/0.3", body, Prefer="respond-async, wait=10")
    assert (response.status_code, response.content) == (200, body)
    assert response.headers["X-Echo-Method"] == "POST"
    assert time.monotonic() - started < 5


def test_wait_gives_202_when_not_ready_and_the_job_goes_on(gateway, jobs_service, downstream):
    body = uuid.uuid4().bytes
    started = time.monotonic()
    response = post(gateway, jobs_service, "/sleep/3", body, Prefer="respond-async, wait=1")
    elapsed = time.monotonic() - started
    assert response.status_code == 202, response.text
    assert 0.9 < elapsed < 2.5, elapsed
    location = response.headers["Location"]
    assert location.startswith("/jobs/")
    wait_for(lambda: requests.get(gateway.url + location).status_code == 200, 15, "the job")
    assert requests.get(gateway.url + location).content == body
    assert len(calls_with(downstream, body)) == 1
    text = requests.get(gateway.url + "/metrics").text
    assert f'proxymq_gateway_async_fallbacks_total{{service="{jobs_service}"}}' in text


def test_without_wait_respond_async_is_202_at_once(gateway, jobs_service):
    response = post(gateway, jobs_service, "/sleep/0.3", b"x", Prefer="respond-async")
    assert response.status_code == 202


# -- X-ProxyMQ-Priority ------------------------------------------------------------------


def test_a_bad_priority_is_400(gateway, served):
    for value in ("-1", "256", "high", "1.5", ""):
        response = post(gateway, served, "/x", b"", **{"X-ProxyMQ-Priority": value})
        assert response.status_code == 400, (value, response.text)
        assert response.headers["X-ProxyMQ-Error"] == "bad-request"


def test_a_quorum_queue_with_priorities_is_refused_at_start(stack, downstream):
    worker = stack.worker(
        unique_service("qprio"),
        downstream.url,
        wait=False,
        PROXYMQ_QUEUE_TYPE="quorum",
        PROXYMQ_MAX_PRIORITY="5",
    )
    assert worker.popen.wait(30) == 1
    errors = [line for line in worker.log().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "PROXYMQ_MAX_PRIORITY" in errors[0], worker.log()
    assert "Traceback" not in worker.log()


def queued_priorities(queue: str, count: int) -> list[int | None]:
    """Take ``count`` messages off ``queue`` (the test's own): their AMQP priorities."""
    import kombu
    from support import BROKER_URL

    with kombu.Connection(BROKER_URL) as connection:
        channel = connection.default_channel
        messages = [channel.basic_get(queue, no_ack=True) for _ in range(count)]
    return [message.properties.get("priority") for message in messages]


def test_a_client_priority_is_ignored_unless_allowed_and_capped_at_the_setting(stack, downstream):
    service = unique_service("priocap")
    stack.worker(service, downstream.url, PROXYMQ_MAX_PRIORITY="9").stop()  # declares it
    default = stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)
    capped = stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL, PROXYMQ_MAX_CLIENT_PRIORITY="3")
    asked = {"Prefer": "respond-async", "X-ProxyMQ-Priority": "255"}
    assert post(default, service, "/anonymous", b"", **asked).status_code == 202
    wait_for(lambda: queue_depth(f"{service}_requests") == 1, 10, "the request")
    assert queued_priorities(f"{service}_requests", 1) == [None]
    # Ignored means not even read: a malformed value is no error either.
    bad = {"Prefer": "respond-async", "X-ProxyMQ-Priority": "high"}
    assert post(default, service, "/anonymous", b"", **bad).status_code == 202
    wait_for(lambda: queue_depth(f"{service}_requests") == 1, 10, "the second request")
    assert queued_priorities(f"{service}_requests", 1) == [None]
    assert post(capped, service, "/allowed", b"", **asked).status_code == 202
    wait_for(lambda: queue_depth(f"{service}_requests") == 1, 10, "the capped request")
    assert queued_priorities(f"{service}_requests", 1) == [3]


def queue_depth(queue: str) -> int:
    import kombu
    from support import BROKER_URL

    with kombu.Connection(BROKER_URL) as connection:
        return connection.default_channel.queue_declare(queue, passive=True)[1]


def backlog(gateway, service, low: int, high: int) -> None:
    """``low`` priority-0 jobs, then ``high`` priority-9 ones, while nobody consumes."""

    def submit(path, priority):
        headers = {"Prefer": "respond-async", "X-ProxyMQ-Priority": str(priority)}
        assert post(gateway, service, path, b"", **headers).status_code == 202

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: submit(f"/low/{i}", 0), range(low)))
    for i in range(high):
        submit(f"/high/{i}", 9)
    wait_for(lambda: queue_depth(f"{service}_requests") == low + high, 10, "the backlog")


def test_under_backlog_higher_priorities_are_served_first(stack, gateway, downstream):
    service = unique_service("prio")
    env = {"PROXYMQ_RESULT_URL": RESULT_URL, "PROXYMQ_MAX_PRIORITY": "9"}
    stack.worker(service, downstream.url, **env).stop()
    assert consumers(f"{service}_requests") == 0
    before = len(downstream.seen)
    backlog(gateway, service, 200, 10)
    stack.worker(service, downstream.url, "-c", "2", **env)
    paths = []

    def all_served():
        paths[:] = [
            s.raw_uri
            for s in list(downstream.seen)[before:]
            if s.raw_uri.startswith(("/low", "/high"))
        ]
        return len(paths) >= 210

    wait_for(all_served, 60, "the backlog to be served")
    positions = [i for i, path in enumerate(paths) if path.startswith("/high")]
    assert len(positions) == 10
    assert max(positions) < 14, positions  # -c 2: at most a prefetch's worth of low first
    text = requests.get(gateway.url + "/metrics").text
    assert (
        f'proxymq_gateway_requests_by_priority_total{{priority="9",service="{service}"}} 10.0'
        in text
    )


def test_under_backlog_higher_priority_synchronous_requests_are_answered_first(
    stack, gateway, downstream
):
    service = unique_service("priosync")
    stack.worker(service, downstream.url, PROXYMQ_MAX_PRIORITY="9").stop()
    answered: list[str] = []
    lock = threading.Lock()

    def call(path, priority):
        response = post(gateway, service, path, b"", **{"X-ProxyMQ-Priority": str(priority)})
        assert response.status_code == 200
        with lock:
            answered.append(path)

    with ThreadPoolExecutor(210) as pool:
        done = [pool.submit(call, f"/low/{i}", 0) for i in range(200)]
        wait_for(lambda: queue_depth(f"{service}_requests") == 200, 30, "the low backlog")
        done += [pool.submit(call, f"/high/{i}", 9) for i in range(10)]
        wait_for(lambda: queue_depth(f"{service}_requests") == 210, 30, "the backlog")
        stack.worker(service, downstream.url, "-c", "2", PROXYMQ_MAX_PRIORITY="9")
        for future in done:
            future.result(60)
    positions = [i for i, path in enumerate(answered) if path.startswith("/high")]
    assert len(positions) == 10
    assert max(positions) < 20, positions


class BatchEndpoint:
    """A batch downstream that records the order of the items it was sent."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, self._app, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _app(self, environ, start_response):
        items = json.loads(Request(environ).get_data())
        with self._lock:
            self.paths.extend(item["path"] for item in items)
        time.sleep(0.02)
        answer = [
            {"correlation_id": i["correlation_id"], "status": 200, "headers": {}, "body": "ok"}
            for i in items
        ]
        return Response(json.dumps(answer), content_type="application/json")(
            environ, start_response
        )


def test_under_backlog_batches_take_higher_priorities_first(stack, gateway):
    endpoint = BatchEndpoint()
    url = f"http://127.0.0.1:{endpoint.port}"
    service = unique_service("prioba")
    env = {
        "PROXYMQ_RESULT_URL": RESULT_URL,
        "PROXYMQ_MAX_PRIORITY": "9",
        "PROXYMQ_BATCH_URL": url + "/batch",
        "PROXYMQ_BATCH_SIZE": "5",
    }
    try:
        stack.worker(service, url, **env).stop()
        backlog(gateway, service, 100, 10)
        stack.worker(service, url, "-c", "1", **env)
        wait_for(lambda: len(endpoint.paths) >= 110, 60, "the backlog to be served")
        positions = [i for i, path in enumerate(endpoint.paths) if path.startswith("/high")]
        assert len(positions) == 10
        assert max(positions) < 20, positions
    finally:
        endpoint.server.shutdown()


# -- headers only the gateway sets ---------------------------------------------------------


class ImpostorDownstream(RawServer):
    """Answers with the headers that mark the gateway's own answers: its error code, a
    correlation id, a replay; as a whole answer or as an event stream."""

    def answer(self, conn: socket.socket) -> None:
        request = conn.recv(65536)
        streamed = b"/stream" in request.split(b"\r\n")[0]
        head = (
            "HTTP/1.1 200 OK\r\nX-ProxyMQ-Error: queue-full\r\nX-Correlation-ID: forged\r\n"
            "Idempotent-Replayed: true\r\nX-Keep: yes\r\n"
        )
        if streamed:
            head += "Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            conn.sendall(head.encode() + b"3\r\nok\n\r\n0\r\n\r\n")
        else:
            conn.sendall(head.encode() + b"Content-Length: 3\r\n\r\nok\n")
        with contextlib.suppress(OSError):
            conn.recv(1)
        conn.close()


@pytest.mark.parametrize("path", ["/whole", "/stream"])
def test_a_downstream_cannot_pass_its_answer_off_as_the_gateways(stack, gateway, path):
    """SPEC: a client can always tell the gateway's own errors from the downstream's
    answers, by ``X-ProxyMQ-Error``; and an answer has one correlation id, the
    gateway's, and is a replay only when the gateway says so."""
    service = unique_service("impostor")
    stack.worker(service, ImpostorDownstream().url)
    response = requests.get(f"{gateway.url}/{service}{path}", timeout=30)
    assert (response.status_code, response.content) == (200, b"ok\n")
    assert response.headers["X-Keep"] == "yes"
    assert "X-ProxyMQ-Error" not in response.headers
    assert "Idempotent-Replayed" not in response.headers
    assert uuid.UUID(response.headers["X-Correlation-ID"])  # one, the gateway's

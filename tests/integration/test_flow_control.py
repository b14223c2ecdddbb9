"""Flow control through the real broker, Redis and several real workers: the limits hold
across workers, counted at the downstream (``CapacityStub``), never at the worker."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
import redis
import requests
from support import (
    BIN,
    ROOT,
    Scrape,
    base_env,
    consumers,
    delete_queues,
    free_port,
    poll_until_done,
    queue_counts,
    unique_service,
    wait_for,
)
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class CapacityStub:
    """A downstream that can serve ``capacity`` calls at once and answers 429 beyond.

    ``/work/<s>`` takes s seconds; ``/retry-after/<s>`` answers 503 with that
    ``Retry-After`` the first time, 200 after; ``/flaky/<n>/<key>`` answers 502 to the
    first n calls of its path, 200 after; anything answers 500 while ``failing``.
    ``/batch`` answers its first ``batch_failures`` calls 502 whole, then each item 200,
    or 502 for an item whose path starts ``/bad``.
    It records every call's start (monotonic) and the most calls it ever had in flight."""

    capacity: int = 1000
    in_flight: int = 0
    max_in_flight: int = 0
    starts: list[tuple[float, str]] = field(default_factory=list)
    refused: int = 0
    failing: bool = False
    batch_failures: int = 0
    attempts: list[tuple[str, str, str]] = field(default_factory=list)  # path, id, attempt
    streams: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.server = make_server("127.0.0.1", self.port, self._app, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, path: str = "") -> list[float]:
        with self._lock:
            return [at for at, p in self.starts if p.startswith(path)]

    def _app(self, environ, start_response):
        request = Request(environ)
        with self._lock:
            self.starts.append((time.monotonic(), request.path))
            self.attempts.append(
                (
                    request.path,
                    request.headers.get("X-Correlation-ID", ""),
                    request.headers.get("X-ProxyMQ-Attempt", ""),
                )
            )
            if self.in_flight >= self.capacity:
                self.refused += 1
                return Response("busy", status=429)(environ, start_response)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._answer(request)(environ, start_response)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, request: Request) -> Response:
        kind, _, arg = request.path.strip("/").partition("/")
        if kind == "batch":  # SPEC's batch contract
            items = json.loads(request.get_data())
            time.sleep(0.2)
            if len(self.calls("/batch")) <= self.batch_failures:
                return Response("down", status=502)
            answer = [
                {
                    "correlation_id": i["correlation_id"],
                    "status": 502 if i["path"].startswith("/bad") else 200,
                    "body": "ok",
                }
                for i in items
            ]
            return Response(json.dumps(answer), content_type="application/json")
        if self.failing:
            return Response("broken", status=500)
        if kind == "work":
            time.sleep(float(arg))
        if kind == "stream":
            return Response(self._stream(float(arg)), content_type="text/event-stream")
        if kind == "flaky" and len(self.calls(request.path)) <= int(arg.split("/")[0]):
            return Response("flaky", status=502)
        if kind == "retry-after" and len(self.calls("/retry-after")) == 1:
            return Response("later", status=503, headers={"Retry-After": arg})
        return Response(b"ok")

    def _stream(self, seconds: float):
        """An event stream of a part every 0.5 s for ``seconds`` (its span recorded)."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            yield b"data: part\n\n"
            time.sleep(0.5)
        with self._lock:
            self.streams.append((started, time.monotonic()))


@pytest.fixture
def capacity_stub():
    stub = CapacityStub()
    yield stub
    stub.server.shutdown()


@pytest.fixture
def service():
    name = unique_service("flow")
    yield name
    delete_queues(f"{name}_requests")
    redis.Redis.from_url(REDIS_URL).delete(
        *(f"proxymq:flow:{{{name}}}:{k}" for k in ("leases", "rate", "workers", "auto"))
    )


@pytest.fixture(scope="module")
def gateway(stack):
    """With a result store: jobs are accepted while the gateway fails fast (issue 25)."""
    return stack.gateway(PROXYMQ_RESULT_URL=REDIS_URL)


def get(gateway, service, path, timeout=60, **headers):
    return requests.get(f"{gateway.url}/{service}{path}", headers=headers, timeout=timeout)


def concurrently(calls):
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def workers(stack, service, url, count, *extra, **env):
    env.setdefault("PROXYMQ_RESULT_URL", REDIS_URL)
    return [stack.worker(service, url, *extra, **env) for _ in range(count)]


# -- the concurrency cap -------------------------------------------------------------------


def test_the_concurrency_cap_holds_across_workers(stack, gateway, capacity_stub, service):
    workers(stack, service, capacity_stub.url, 3, "-c", "8", PROXYMQ_MAX_CONCURRENCY="3")
    responses = concurrently([lambda: get(gateway, service, "/work/0.2")] * 30)
    assert [r.status_code for r in responses] == [200] * 30
    assert len(capacity_stub.calls()) == 30  # each called once: none refused, none repeated
    assert capacity_stub.max_in_flight <= 3  # 24 call threads between them
    assert capacity_stub.max_in_flight >= 2  # and the cap is used, not one at a time


def test_a_flow_control_that_fails_serves_the_calls_without_it(
    stack, gateway, capacity_stub, service
):
    """Flow control never stops a service that would otherwise be served: an error of
    its own (tests/integration/faults: ``Flow.enter`` raises) is logged and the call made."""
    faults = str(ROOT / "tests" / "integration" / "faults")
    (worker,) = workers(
        stack,
        service,
        capacity_stub.url,
        1,
        "-c",
        "4",
        PROXYMQ_MAX_CONCURRENCY="2",
        PYTHONPATH=faults,
        TEST_FAULTS="flow",
    )
    wait_for(lambda: "flow raise" in worker.log(), 10, "the fault installed")
    responses = concurrently([lambda: get(gateway, service, "/work/0.1", timeout=30)] * 8)
    assert [r.status_code for r in responses] == [200] * 8
    assert len(capacity_stub.calls()) == 8
    wait_for(lambda: queue_counts(f"{service}_requests") == (0, 0), 15, "all acknowledged")
    assert "the flow control of" in worker.log()  # the fault really ran


def test_a_worker_takes_no_more_requests_than_the_cap(stack, gateway, capacity_stub, service):
    """The rest stays in the queue, for a worker that may call: none is hoarded."""
    workers(stack, service, capacity_stub.url, 2, "-c", "16", PROXYMQ_MAX_CONCURRENCY="2")
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        futures = [pool.submit(get, gateway, service, "/work/0.5") for _ in range(30)]
        wait_for(lambda: queue_counts(f"{service}_requests")[0] > 0, 20, "requests queued")
        ready, unacknowledged = queue_counts(f"{service}_requests")
        assert unacknowledged <= 2 * 2, (ready, unacknowledged)
        assert all(f.result().status_code == 200 for f in futures)
    assert capacity_stub.max_in_flight <= 2


def test_a_request_that_waits_past_its_deadline_is_answered_504_and_never_called(
    stack, gateway, capacity_stub, service
):
    workers(stack, service, capacity_stub.url, 2, PROXYMQ_MAX_CONCURRENCY="1")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(get, gateway, service, "/work/4")
        wait_for(lambda: capacity_stub.calls("/work"), 20, "the slow call")
        started = time.monotonic()
        late = get(gateway, service, "/never", **{"X-ProxyMQ-Timeout": "1"})
        took = time.monotonic() - started
        assert slow.result().status_code == 200
    assert late.status_code == 504
    assert took < 3.5  # at its deadline, not when the slot freed up
    time.sleep(0.5)
    assert capacity_stub.calls("/never") == []


def test_a_worker_killed_holding_slots_gives_them_back(stack, gateway, capacity_stub, service):
    """Its leases expire PROXYMQ_DOWNSTREAM_TIMEOUT + 10 s after they were taken."""
    env = {"PROXYMQ_MAX_CONCURRENCY": "2", "PROXYMQ_DOWNSTREAM_TIMEOUT": "2"}
    (doomed,) = workers(stack, service, capacity_stub.url, 1, **env)
    leases = redis.Redis.from_url(REDIS_URL)
    key = f"proxymq:flow:{{{service}}}:leases"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            pool.submit(get, gateway, service, "/work/30", timeout=5)
        wait_for(lambda: leases.zcard(key) == 2, 20, "both slots taken")
        doomed.kill()
    killed = time.monotonic()
    workers(stack, service, capacity_stub.url, 1, **env)
    response = get(gateway, service, "/after")
    assert response.status_code == 200
    assert time.monotonic() - killed < 2 + 10 + 10  # the leases' bound, and room to spare


def test_a_stream_longer_than_the_lease_bound_keeps_its_slot(
    stack, gateway, capacity_stub, service
):
    """A streamed body is not bounded by PROXYMQ_DOWNSTREAM_TIMEOUT, so its lease (that
    timeout + 10 s) must be kept alive while it runs: no other call starts under a cap
    of 1 until the stream ended."""
    env = {"PROXYMQ_MAX_CONCURRENCY": "1", "PROXYMQ_DOWNSTREAM_TIMEOUT": "1"}
    workers(stack, service, capacity_stub.url, 2, **env)
    url = f"{gateway.url}/{service}/stream/16"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(
            lambda: requests.get(url, headers={"X-ProxyMQ-Timeout": "60"}, timeout=60).text
        )
        wait_for(lambda: capacity_stub.calls("/stream"), 20, "the stream")
        plain = get(gateway, service, "/plain", **{"X-ProxyMQ-Timeout": "50"})
        assert "data: part" in streamed.result()
    assert plain.status_code == 200
    ((stream_start, stream_end),) = capacity_stub.streams
    (plain_start,) = capacity_stub.calls("/plain")
    assert plain_start >= stream_end - 0.6, (plain_start - stream_start, stream_end - stream_start)


# -- configuration -------------------------------------------------------------------------


def start_worker(**env):
    service = unique_service("flowconf")
    return subprocess.run(
        [str(BIN / "celery"), "-A", "workers", "worker", "-Q", f"{service}_requests"],
        cwd=ROOT,
        env=base_env(PROXYMQ_DOWNSTREAM_URL="http://127.0.0.1:9", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PROXYMQ_MAX_CONCURRENCY": "8"}, "PROXYMQ_MAX_CONCURRENCY"),
        ({"PROXYMQ_RATE_LIMIT": "5/s"}, "PROXYMQ_RATE_LIMIT"),
        (
            {"PROXYMQ_MAX_CONCURRENCY": "0", "PROXYMQ_RESULT_URL": REDIS_URL},
            "PROXYMQ_MAX_CONCURRENCY",
        ),
        ({"PROXYMQ_RATE_LIMIT": "5/day", "PROXYMQ_RESULT_URL": REDIS_URL}, "PROXYMQ_RATE_LIMIT"),
        ({"PROXYMQ_MAX_PAUSE": "soon"}, "PROXYMQ_MAX_PAUSE"),
    ],
)
def test_a_bad_or_unshareable_limit_stops_the_worker_with_one_line(env, variable):
    result = start_worker(**env)
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {variable}: ")


# -- the rate limit ------------------------------------------------------------------------


def test_the_rate_limit_holds_in_every_second_across_workers(
    stack, gateway, capacity_stub, service
):
    env = {"PROXYMQ_RATE_LIMIT": "5/s", "PROXYMQ_RATE_BURST": "1"}
    workers(stack, service, capacity_stub.url, 2, "-c", "8", **env)
    responses = concurrently([lambda: get(gateway, service, "/quick")] * 20)
    assert [r.status_code for r in responses] == [200] * 20
    starts = sorted(capacity_stub.calls("/quick"))
    assert len(starts) == 20
    busiest = max(sum(1 for s in starts if t <= s < t + 1) for t in starts)
    assert busiest <= 5 + 2, busiest  # 5 a second, and room for the clocks' jitter
    assert starts[-1] - starts[0] >= 19 / 5 * 0.8


# -- pauses --------------------------------------------------------------------------------


def submit(gateway, service, path) -> str:
    """A job (accepted while the gateway refuses synchronous requests); its Location."""
    answer = requests.post(
        f"{gateway.url}/{service}{path}", data=b"x", headers={"Prefer": "respond-async"}, timeout=30
    )
    assert answer.status_code == 202
    return answer.headers["Location"]


def test_a_retry_after_pauses_the_service_on_every_worker(stack, gateway, capacity_stub, service):
    """Jobs, since the gateway answers synchronous requests 503 at once during the pause
    (issue 25). Under the cap (not binding), a worker that has not heard of the pause
    yet and has no lease kept from a call of its own takes one through Redis, which
    reads the pause key: it starts no call in the pause."""
    workers(stack, service, capacity_stub.url, 2, "-c", "4", PROXYMQ_MAX_CONCURRENCY="8")
    first = get(gateway, service, "/retry-after/3")
    assert first.status_code == 503  # the answer the client asked for
    paused_at = capacity_stub.calls("/retry-after")[0]
    jobs = [submit(gateway, service, "/after") for _ in range(8)]
    assert [poll_until_done(gateway, job).status_code for job in jobs] == [200] * 8
    assert len(capacity_stub.calls("/after")) == 8
    assert min(capacity_stub.calls("/after")) >= paused_at + 3 - 0.5


# -- the breaker ---------------------------------------------------------------------------


def test_the_breaker_opens_on_failures_and_lets_a_single_probe_through(
    stack, gateway, capacity_stub, service
):
    env = {"PROXYMQ_BREAKER_FAILURES": "3", "PROXYMQ_BREAKER_OPEN": "2"}
    workers(stack, service, capacity_stub.url, 2, "-c", "4", **env)
    capacity_stub.failing = True
    assert [get(gateway, service, "/fail").status_code for _ in range(3)] == [500] * 3
    opened = capacity_stub.calls("/fail")[-1]
    capacity_stub.failing = False
    jobs = [submit(gateway, service, "/work/0.5") for _ in range(6)]
    assert [poll_until_done(gateway, job).status_code for job in jobs] == [200] * 6
    starts = sorted(capacity_stub.calls("/work"))
    assert starts[0] >= opened + 2 - 0.3  # nothing while it was open
    assert starts[1] >= starts[0] + 0.45  # the probe alone, then the rest


# -- Redis down ----------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of the test's own, to stop and start (never the shared one)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_for(lambda: redis.Redis(port=self.port).ping(), 10, "private redis")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis():
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


def test_a_redis_stall_leaves_no_lease_held_by_no_call(
    stack, gateway, capacity_stub, service, private_redis
):
    """Redis stalls (a fork, a slow command, a failover) while calls take and give back
    leases under a fixed cap. A command the worker gave up on after ``TIMEOUT_S`` still
    runs once Redis answers: a lease taken for a call that went on with a local slot, or
    one whose ``ZREM`` timed out, stayed in the set unknown to the worker for
    PROXYMQ_DOWNSTREAM_TIMEOUT + 10 s, the cap held by no call and every worker's calls
    waiting (found by attacking the round's change)."""
    stack.worker(
        service,
        capacity_stub.url,
        "-c",
        "8",
        PROXYMQ_RESULT_URL=private_redis.url,
        PROXYMQ_MAX_CONCURRENCY="2",
        PROXYMQ_DOWNSTREAM_TIMEOUT="20",
    )
    shared = redis.Redis(port=private_redis.port)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            with contextlib.suppress(requests.RequestException):
                get(gateway, service, "/work/0.1", timeout=8)

    def more_calls(n: int) -> None:
        before = len(capacity_stub.calls("/work"))
        wait_for(lambda: len(capacity_stub.calls("/work")) >= before + n, 30, "calls going on")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        loaders = [pool.submit(load) for _ in range(8)]
        try:
            for _ in range(2):
                more_calls(4)
                shared.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # as DEBUG SLEEP
                shared.ping()  # answered when the pause is over
            more_calls(8)
        finally:
            stop.set()
        for loader in loaders:
            loader.result()
    leases = f"proxymq:flow:{{{service}}}:leases"
    wait_for(lambda: shared.zrange(leases, 0, -1) == [], 5, "no lease held by no call")
    assert get(gateway, service, "/work/0", timeout=8).status_code == 200


def test_with_redis_down_each_worker_keeps_its_share_and_nothing_stops(
    stack, gateway, capacity_stub, service, private_redis
):
    ports = [free_port(), free_port()]
    for port in ports:
        stack.worker(
            service,
            capacity_stub.url,
            "-c",
            "8",
            PROXYMQ_RESULT_URL=private_redis.url,
            PROXYMQ_MAX_CONCURRENCY="2",
            PROXYMQ_WORKER_METRICS_PORT=str(port),
        )
    registry = f"proxymq:flow:{{{service}}}:workers"
    shared = redis.Redis(port=private_redis.port)
    wait_for(lambda: shared.zcard(registry) == 2, 20, "both registered")
    both = time.time() * 1000  # each worker's next heartbeat counts the other one
    wait_for(
        lambda: min(s for _, s in shared.zrange(registry, 0, -1, withscores=True)) > both,
        20,
        "both counted",
    )

    def degraded() -> list[float]:
        return [
            Scrape(f"http://127.0.0.1:{p}/metrics").value(
                "proxymq_worker_flow_degraded", service=service
            )
            for p in ports
        ]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(get, gateway, service, "/work/0.1") for _ in range(100)]
        wait_for(lambda: len(capacity_stub.calls("/work")) >= 10, 30, "calls under load")
        private_redis.stop()
        wait_for(lambda: degraded() == [1, 1], 20, "both workers degraded")
        time.sleep(0.3)  # the calls started under the shared limit end (0.1 s each)
        capacity_stub.max_in_flight = capacity_stub.in_flight
        degraded_from = len(capacity_stub.calls("/work"))
        assert [f.result().status_code for f in futures] == [200] * 100
    assert len(capacity_stub.calls("/work")) - degraded_from >= 10  # load went on, degraded
    assert capacity_stub.max_in_flight <= 2  # 2 ÷ 2 workers each while degraded
    private_redis.start()
    wait_for(lambda: degraded() == [0, 0], 20, "back to the shared limit")
    assert get(gateway, service, "/work/0").status_code == 200


def test_a_redis_that_refuses_writes_falls_back_like_one_that_is_down(
    stack, gateway, capacity_stub, service, private_redis
):
    """A Redis turned read-only replica (a failover) answers every script with READONLY:
    the limits fall back to the worker's share rather than every call failing unseen,
    never answered nor settled."""
    stack.worker(
        service,
        capacity_stub.url,
        PROXYMQ_RESULT_URL=private_redis.url,
        PROXYMQ_MAX_CONCURRENCY="2",
    )
    assert get(gateway, service, "/before").status_code == 200
    redis.Redis(port=private_redis.port).replicaof("127.0.0.1", str(free_port()))
    answers = concurrently(
        [lambda: get(gateway, service, "/work/0.1", **{"X-ProxyMQ-Timeout": "10"})] * 4
    )
    assert [a.status_code for a in answers] == [200] * 4
    assert capacity_stub.max_in_flight <= 2


# -- retries -------------------------------------------------------------------------------


def test_a_safe_request_is_retried_with_its_correlation_id_and_attempt_numbers(
    stack, gateway, capacity_stub, service
):
    env = {"PROXYMQ_RETRIES": "2", "PROXYMQ_RETRY_BACKOFF_MS": "50", "PROXYMQ_RETRY_BUDGET": "1"}
    workers(stack, service, capacity_stub.url, 2, **env)
    response = get(gateway, service, "/flaky/2/a")
    assert response.status_code == 200
    seen = [(i, a) for p, i, a in capacity_stub.attempts if p == "/flaky/2/a"]
    assert [a for _, a in seen] == ["1", "2", "3"]
    assert {i for i, _ in seen} == {response.headers["X-Correlation-ID"]}


def test_an_unsafe_request_is_not_retried(stack, gateway, capacity_stub, service):
    env = {"PROXYMQ_RETRIES": "2", "PROXYMQ_RETRY_BACKOFF_MS": "50", "PROXYMQ_RETRY_BUDGET": "1"}
    workers(stack, service, capacity_stub.url, 1, **env)
    response = requests.post(f"{gateway.url}/{service}/flaky/1/b", data=b"x", timeout=30)
    assert response.status_code == 502
    assert len(capacity_stub.calls("/flaky/1/b")) == 1


def test_a_retry_waits_no_longer_than_the_max_pause_whatever_retry_after_asks(
    stack, gateway, capacity_stub, service
):
    """A hostile Retry-After (40 s) must not keep a retried request waiting in the worker
    (unacknowledged, in its prefetch) past PROXYMQ_MAX_PAUSE, which bounds every pause."""
    env = {"PROXYMQ_RETRIES": "1", "PROXYMQ_RETRY_BUDGET": "1", "PROXYMQ_MAX_PAUSE": "1"}
    workers(stack, service, capacity_stub.url, 1, **env)
    started = time.monotonic()
    response = get(gateway, service, "/retry-after/40", **{"X-ProxyMQ-Timeout": "60"})
    took = time.monotonic() - started
    assert response.status_code == 200
    assert len(capacity_stub.calls("/retry-after")) == 2
    assert took < 20, took


def test_a_worker_killed_during_a_backoff_leaves_the_request_to_another_worker(
    stack, gateway, capacity_stub, service
):
    """The backoff holds the request unacknowledged: SIGKILL then, and the broker delivers
    it to the next worker, which calls once more; it is neither lost nor called twice."""
    env = {"PROXYMQ_RETRIES": "1", "PROXYMQ_RETRY_BUDGET": "1"}
    (doomed,) = workers(stack, service, capacity_stub.url, 1, **env)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(get, gateway, service, "/retry-after/4", **{"X-ProxyMQ-Timeout": "60"})
        wait_for(lambda: capacity_stub.calls("/retry-after"), 20, "the first attempt")
        time.sleep(0.5)  # its answer read, the retry waiting on the worker's timer
        doomed.kill()
        workers(stack, service, capacity_stub.url, 1, **env)
        assert answer.result().status_code == 200
    assert len(capacity_stub.calls("/retry-after")) == 2
    wait_for(lambda: queue_counts(f"{service}_requests") == (0, 0), 20, "settled once")


def test_a_connection_lost_during_a_backoff_calls_the_request_once_more_not_twice(
    stack, gateway, capacity_stub, service
):
    """The broker redelivers the request on the worker's new connection; the old
    delivery's retry timer still fires, and must neither call nor settle it again."""
    from test_stream_prefetch import close_connection_of

    env = {"PROXYMQ_RETRIES": "1", "PROXYMQ_RETRY_BUDGET": "1"}
    workers(stack, service, capacity_stub.url, 1, **env)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(get, gateway, service, "/retry-after/4", **{"X-ProxyMQ-Timeout": "60"})
        wait_for(lambda: capacity_stub.calls("/retry-after"), 20, "the first attempt")
        time.sleep(0.5)  # its answer read, the retry waiting on the worker's timer
        close_connection_of(f"{service}_requests")
        assert answer.result().status_code == 200
    time.sleep(5)  # the old delivery's timer has fired by now
    assert len(capacity_stub.calls("/retry-after")) == 2
    wait_for(lambda: queue_counts(f"{service}_requests") == (0, 0), 20, "settled once")
    assert get(gateway, service, "/after").status_code == 200


def test_retries_stay_within_their_budget(stack, gateway, capacity_stub, service):
    """20 requests to a service that always fails, 3 retries each allowed: without the
    budget (0.2 of the calls) 80 calls, with it at most a quarter more than 20."""
    env = {"PROXYMQ_RETRIES": "3", "PROXYMQ_RETRY_BACKOFF_MS": "10"}
    workers(stack, service, capacity_stub.url, 2, **env)
    responses = concurrently([lambda: get(gateway, service, "/flaky/1000/c")] * 20)
    assert [r.status_code for r in responses] == [502] * 20
    calls = len(capacity_stub.calls("/flaky/1000/c"))
    assert 20 < calls <= 20 + 20 // 4 + 2, calls  # some retried, within the budget


def test_the_retry_budget_is_the_services_not_each_workers(stack, gateway, capacity_stub, service):
    """Worker A makes calls that succeed until it stops consuming; then only worker B
    consumes, and 6 requests fail. B's own calls (6) would allow no retry at the default
    0.2; the service's (A's too, over the last 10 s) allow each of the 6 one. Retries
    stay within 0.2 of all calls at the stub."""
    queue = f"{service}_requests"
    env = {"PROXYMQ_RETRIES": "1", "PROXYMQ_RETRY_BACKOFF_MS": "10"}
    env["PROXYMQ_RESULT_URL"] = REDIS_URL
    nodes = [f"budget{n}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}" for n in "ab"]
    for node in nodes:
        stack.worker(service, capacity_stub.url, "-n", node, named=False, **env)
    assert _celery("control", "cancel_consumer", queue, "-d", nodes[1]).returncode == 0
    wait_for(lambda: consumers(queue) == 1, 20, "only worker A consumes")
    stop = threading.Event()

    def succeed() -> None:  # A's calls, up to the moment it stops consuming
        while not stop.is_set():
            assert get(gateway, service, "/work/0").status_code == 200

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        loops = [pool.submit(succeed) for _ in range(4)]
        wait_for(lambda: len(capacity_stub.calls("/work/")) >= 30, 30, "A's calls")
        assert _celery("control", "cancel_consumer", queue, "-d", nodes[0]).returncode == 0
        wait_for(lambda: consumers(queue) == 0, 20, "nobody consumes")
        stop.set()
        assert _celery("control", "add_consumer", queue, "-d", nodes[1]).returncode == 0
        wait_for(lambda: consumers(queue) == 1, 20, "only worker B consumes")
        for loop in loops:
            loop.result()  # the last ones waited for B
    failing = [get(gateway, service, f"/flaky/1000/{n}") for n in range(6)]
    assert [r.status_code for r in failing] == [502] * 6
    attempts = [a for p, _, a in capacity_stub.attempts if p.startswith("/flaky/")]
    assert sorted(attempts) == ["1"] * 6 + ["2"] * 6, attempts  # each retried once, by B
    retries = sum(a != "1" for _, _, a in capacity_stub.attempts)
    assert retries <= 0.2 * len(capacity_stub.attempts) + 1


def _celery(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "celery"), "-A", "workers", *args],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- auto ----------------------------------------------------------------------------------


def test_auto_concurrency_finds_the_capacity_of_a_service_that_answers_429_beyond_it(
    stack, gateway, capacity_stub, service
):
    """32 clients, 3 workers x 16 threads, a service that takes 4 calls at once: without
    a limit most calls would be 429; ``auto`` settles near 4 and few are."""
    capacity_stub.capacity = 4
    workers(stack, service, capacity_stub.url, 3, "-c", "16", PROXYMQ_MAX_CONCURRENCY="auto")
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        statuses = list(
            pool.map(lambda _: get(gateway, service, "/work/0.05").status_code, range(400))
        )
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) <= 400 * 0.05, statuses.count(429)
    limit = float(redis.Redis.from_url(REDIS_URL).hget(f"proxymq:flow:{{{service}}}:auto", "limit"))
    assert 2 <= limit <= 6, limit


def test_under_auto_a_worker_holds_no_more_requests_than_the_limit(
    stack, gateway, capacity_stub, service
):
    """A service that takes 2 calls at once, 2 workers x 16 threads: each worker's
    prefetch follows the limit (+1, ``PREFETCH_MARGIN``), not -c, so neither holds what
    the other could serve. Counted by the broker, per worker's channel."""
    capacity_stub.capacity = 2
    queue = f"{service}_requests"
    workers(stack, service, capacity_stub.url, 2, "-c", "16", PROXYMQ_MAX_CONCURRENCY="auto")
    channels = _consumer_channels(queue)
    assert len(channels) == 2, channels
    samples = []
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(get, gateway, service, "/work/0.5") for _ in range(40)]
        while not all(f.done() for f in futures):
            held = _unacknowledged(channels)
            limit = redis.Redis.from_url(REDIS_URL).hget(
                f"proxymq:flow:{{{service}}}:auto", "limit"
            )
            samples.append((held, float(limit or 1)))
        statuses = [f.result().status_code for f in futures]
    assert set(statuses) <= {200, 429} and statuses.count(429) <= 4, (statuses, samples)
    busy = [held for held, _ in samples if sum(held.values()) > 0]
    assert busy, samples  # seen while requests were held
    # The limit settles near 2; -c would let each worker hold 16 (about 20 of the 40).
    assert all(n <= 6 for held in busy for n in held.values()), samples
    assert all(any(held[c] > 0 for held in busy) for c in channels), samples  # both serve


def _consumer_channels(queue: str) -> list[str]:
    """The channels (pids) consuming ``queue``: one per worker."""
    listing = _rabbitmqctl("list_consumers", "queue_name", "channel_pid")
    return sorted({pid for name, pid in listing if name == queue})


def _unacknowledged(channels: list[str]) -> dict[str, int]:
    listing = _rabbitmqctl("list_channels", "pid", "messages_unacknowledged")
    return {pid: int(n) for pid, n in listing if pid in channels}


def _rabbitmqctl(*args: str) -> list[list[str]]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    return [line.split("\t") for line in out.splitlines()[1:]]


def test_long_streams_do_not_cut_the_auto_limit(stack, gateway, capacity_stub, service):
    """A stream's length is its body's, not how fast the service answers: streams of a
    few seconds among calls of 50 ms must not read as rising latency and cut ``auto``."""
    workers(stack, service, capacity_stub.url, 1, "-c", "8", PROXYMQ_MAX_CONCURRENCY="auto")
    auto = f"proxymq:flow:{{{service}}}:auto"
    # Four at a time (a limit grows only while in use): slow start, no 429, the floor
    # about 50 ms.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        calls = pool.map(lambda _: get(gateway, service, "/work/0.05"), range(24))
        assert {r.status_code for r in calls} == {200}
    grown = float(redis.Redis.from_url(REDIS_URL).hget(auto, "limit"))
    assert grown >= 3, grown
    for _ in range(3):
        assert "data: part" in get(gateway, service, "/stream/2").text
    limit = float(redis.Redis.from_url(REDIS_URL).hget(auto, "limit"))
    assert limit >= grown, (grown, limit)


def test_calls_cut_off_by_their_own_deadline_do_not_open_the_breaker(
    stack, gateway, capacity_stub, service
):
    """A client with short deadlines must not shut the service for everyone."""
    env = {"PROXYMQ_BREAKER_FAILURES": "2", "PROXYMQ_BREAKER_OPEN": "60"}
    workers(stack, service, capacity_stub.url, 1, **env)
    for _ in range(3):
        assert get(gateway, service, "/work/3", **{"X-ProxyMQ-Timeout": "1"}).status_code == 504
    started = time.monotonic()
    assert get(gateway, service, "/quick").status_code == 200
    assert time.monotonic() - started < 20  # not held for the breaker's 60 s


def test_a_probe_cut_off_by_its_own_deadline_lets_the_next_probe_through(
    stack, gateway, capacity_stub, service
):
    """The probe of a half-open breaker whose client's deadline cut it off says nothing
    of the service: the next request probes, rather than every call waiting out the
    probe's bound (PROXYMQ_DOWNSTREAM_TIMEOUT + 10 s, here 70 s) and answering 504."""
    env = {"PROXYMQ_BREAKER_FAILURES": "1", "PROXYMQ_BREAKER_OPEN": "1"}
    workers(stack, service, capacity_stub.url, 1, **env)
    capacity_stub.failing = True
    assert get(gateway, service, "/fail").status_code == 500
    capacity_stub.failing = False
    time.sleep(1.5)  # the breaker's open second passes: the next call is the probe
    probe = get(gateway, service, "/work/5", **{"X-ProxyMQ-Timeout": "2"})
    assert probe.status_code == 504
    assert len(capacity_stub.calls("/work")) == 1
    after = get(gateway, service, "/quick", **{"X-ProxyMQ-Timeout": "20"})
    assert after.status_code == 200


def test_a_batch_call_counts_as_one_call_under_the_cap(stack, gateway, capacity_stub, service):
    env = {
        "PROXYMQ_BATCH_URL": capacity_stub.url + "/batch",
        "PROXYMQ_BATCH_SIZE": "4",
        "PROXYMQ_MAX_CONCURRENCY": "1",
    }
    workers(stack, service, capacity_stub.url, 2, **env)
    responses = concurrently([lambda: get(gateway, service, "/item")] * 16)
    assert [r.status_code for r in responses] == [200] * 16
    assert capacity_stub.max_in_flight == 1  # two workers, one batch call at a time
    assert len(capacity_stub.calls("/batch")) < 16  # in batches, not one by one


BATCH_RETRIES = {
    "PROXYMQ_RETRIES": "2",
    "PROXYMQ_RETRY_BACKOFF_MS": "50",
    "PROXYMQ_RETRY_BUDGET": "1",
}


def in_one_batch(stack, gateway, capacity_stub, service, calls):
    """Make ``calls`` while the service's worker is stopped, then start one taking them
    all as one batch: their answers."""
    env = {
        "PROXYMQ_BATCH_URL": capacity_stub.url + "/batch",
        "PROXYMQ_BATCH_SIZE": str(len(calls)),
        "PROXYMQ_BATCH_WAIT_MS": "5000",
        **BATCH_RETRIES,
    }
    workers(stack, service, capacity_stub.url, 1, **env)[0].stop()  # the queue stays
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        queued = lambda: queue_counts(f"{service}_requests")[0] == len(calls)  # noqa: E731
        wait_for(queued, 30, "the requests queued")
        workers(stack, service, capacity_stub.url, 1, **env)
        return [future.result() for future in futures]


def test_a_batch_that_failed_whole_is_retried_for_its_safe_items_only(
    stack, gateway, capacity_stub, service
):
    capacity_stub.batch_failures = 1
    safe = lambda: get(gateway, service, "/item")  # noqa: E731
    unsafe = lambda: requests.post(f"{gateway.url}/{service}/post", data=b"x", timeout=60)  # noqa: E731
    responses = in_one_batch(stack, gateway, capacity_stub, service, [safe, unsafe])
    # The first batch call failed whole: the GET was retried (and answered by the
    # second call), the POST was not.
    assert [r.status_code for r in responses] == [200, 502]
    assert len(capacity_stub.calls("/batch")) == 2


def test_a_batch_whose_items_were_answered_is_not_retried_for_a_failed_item(
    stack, gateway, capacity_stub, service
):
    calls = [lambda: get(gateway, service, "/bad"), lambda: get(gateway, service, "/good")]
    responses = in_one_batch(stack, gateway, capacity_stub, service, calls)
    assert [r.status_code for r in responses] == [502, 200]
    assert len(capacity_stub.calls("/batch")) == 1


def test_no_retry_starts_after_the_deadline(stack, gateway, capacity_stub, service):
    env = {"PROXYMQ_RETRIES": "10", "PROXYMQ_RETRY_BACKOFF_MS": "300", "PROXYMQ_RETRY_BUDGET": "1"}
    workers(stack, service, capacity_stub.url, 1, **env)
    sent = time.monotonic()
    response = get(gateway, service, "/flaky/1000/d", **{"X-ProxyMQ-Timeout": "2"})
    assert response.status_code in (502, 504)
    starts = capacity_stub.calls("/flaky/1000/d")
    assert len(starts) >= 2  # retried
    assert max(starts) < sent + 2  # but never past the deadline


def test_redis_flushed_under_load_stops_nothing_and_the_cap_holds_again(
    stack, gateway, capacity_stub, service, private_redis
):
    """The leases, the limit and the registry gone at once (a restart without
    persistence): calls go on, and the cap holds for the calls that start after."""
    for _ in range(2):
        stack.worker(
            service,
            capacity_stub.url,
            "-c",
            "8",
            PROXYMQ_RESULT_URL=private_redis.url,
            PROXYMQ_MAX_CONCURRENCY="2",
        )
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(get, gateway, service, "/work/0.1") for _ in range(60)]
        wait_for(lambda: len(capacity_stub.calls("/work")) >= 10, 30, "calls under load")
        redis.Redis(port=private_redis.port).flushall()
        time.sleep(0.3)  # the calls that held the flushed leases end (0.1 s each)
        capacity_stub.max_in_flight = capacity_stub.in_flight
        assert [f.result().status_code for f in futures] == [200] * 60
    assert capacity_stub.max_in_flight <= 2


# -- the seam with failing fast (issue 25) -------------------------------------------------


def test_a_breaker_the_workers_open_makes_the_gateway_answer_503_at_once(
    stack, gateway, capacity_stub, service
):
    """FlowState -> the status announcer -> every gateway process: no request waits
    for a breaker the workers keep open."""
    env = {"PROXYMQ_BREAKER_FAILURES": "2", "PROXYMQ_BREAKER_OPEN": "30"}
    workers(stack, service, capacity_stub.url, 2, **env)
    capacity_stub.failing = True
    assert [get(gateway, service, "/fail").status_code for _ in range(2)] == [500, 500]

    def refused() -> bool:
        answer = get(gateway, service, "/after-open", **{"X-ProxyMQ-Timeout": "1"})
        return answer.headers.get("X-ProxyMQ-Error") == "service-unavailable"

    wait_for(refused, 20, "the gateway to know the breaker is open")
    started = time.monotonic()
    answer = get(gateway, service, "/after-open")
    assert answer.status_code == 503 and time.monotonic() - started < 2
    assert 1 <= int(answer.headers["Retry-After"]) <= 30
    assert capacity_stub.calls("/after-open") == []

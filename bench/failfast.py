"""Failing fast, measured (issue 25): ``.venv/bin/python bench/failfast.py`` (~1.5 min).

Starts the real gateway (``gunicorn gateway:app``, with a result store for jobs) and a
worker (``celery -A workers worker -c 4``) in front of a downstream of known capacity: a
server in this process that serves one call at a time, ``--cost-ms`` each (so
1000 / cost calls per second, whatever ``-c``), and notes when each correlation id
arrived. Then, in one run:

1. **Breaker open.** The service's breaker is announced open (this script publishes the
   status a worker with an open breaker would, every 2 s: the gateway does not care who
   sets it): the time to answer a new synchronous request, p50/p99 over ``--requests``
   (each followed by a ``GET /healthz`` on the same connection: the floor on this
   machine at that moment), against today's behaviour: the same request published to a
   service nobody serves, answered 504 after its timeout (``X-ProxyMQ-Timeout``).
2. **Backlog.** ``--backlog-s`` seconds of work are queued as jobs; then requests with a
   5 s deadline (answered ``deadline-unreachable``: how many, and how fast) and with a
   60 s deadline (served: how many, and how long they took).
3. **Estimate error.** While the backlog drains, a job is submitted every second and its
   ``eta_seconds`` read at once; its actual start is when the downstream saw it. Median
   and p90 of |estimated - actual|.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kombu
import requests

from proxymq import status as wire

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import support  # the tests' harness: processes, readiness, ports

RESULT_URL = "redis://127.0.0.1:6379/0"


class Downstream:
    """One call at a time, ``cost`` seconds each; the arrival time of every call."""

    def __init__(self, cost: float) -> None:
        self.arrivals: dict[str, float] = {}
        lock = threading.Lock()
        arrivals = self.arrivals

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.time()
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                arrivals[self.headers.get("X-Correlation-Id", "")] = arrived
                with lock:
                    time.sleep(cost)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", support.free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


class Announcer:
    """What a worker with an open breaker announces, every 2 s, until stopped."""

    def __init__(self, broker_url: str, service: str, until: float) -> None:
        self._stop = threading.Event()
        self._args = (broker_url, service, until)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        broker_url, service, until = self._args
        with kombu.Connection(broker_url) as connection:
            exchange = kombu.Exchange(wire.EXCHANGE, wire.EXCHANGE_TYPE, durable=True)
            producer = connection.Producer(exchange=exchange)
            while not self._stop.is_set():
                status = wire.Status(service, "bench", time.time(), until, None, 0.0, 0, 0)
                producer.publish(
                    status.encode(),
                    content_type=wire.CONTENT_TYPE,
                    content_encoding="binary",
                    declare=[exchange],
                )
                self._stop.wait(wire.INTERVAL)

    def stop(self) -> None:
        self._stop.set()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed_post(url: str, headers: dict | None = None) -> tuple[float, requests.Response]:
    started = time.perf_counter()
    response = requests.post(url, data=b"x", headers=headers or {}, timeout=120)
    return time.perf_counter() - started, response


def breaker_open(args, gateway: str) -> dict:
    service = f"ffopen{uuid.uuid4().hex[:6]}"
    announcer = Announcer(args.broker_url, service, time.time() + 600)
    url = f"{gateway}/{service}/x"
    try:
        support.wait_for(lambda: timed_post(url)[1].status_code == 503, 20, "breaker known")
        session = requests.Session()
        times, floor, codes = [], [], set()
        for _ in range(args.requests):
            started = time.perf_counter()
            response = session.post(url, data=b"x", timeout=30)
            times.append(time.perf_counter() - started)
            codes.add(response.headers.get("X-ProxyMQ-Error"))
            floor.append(healthz(session, gateway))
    finally:
        announcer.stop()
    # Today: nothing tells the gateway; the client waits its whole timeout.
    timeout = {"X-ProxyMQ-Timeout": str(args.timeout)}
    nobody = f"{gateway}/ffnobody{uuid.uuid4().hex[:6]}/x"
    with kombu.Connection(args.broker_url) as connection:
        queue = nobody.rsplit("/", 2)[1] + "_requests"
        connection.default_channel.queue_declare(queue, durable=False, auto_delete=False)
        try:
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                today = list(pool.map(lambda _: timed_post(nobody, timeout), range(3)))
        finally:
            connection.default_channel.queue_delete(queue)
    return {
        "requests": args.requests,
        "codes": sorted(c or "" for c in codes),
        "p50_ms": percentile(times, 0.5) * 1000,
        "p99_ms": percentile(times, 0.99) * 1000,
        "healthz_p50_ms": percentile(floor, 0.5) * 1000,
        "healthz_p99_ms": percentile(floor, 0.99) * 1000,
        "today_s": statistics.median(t for t, _ in today),
        "today_codes": sorted({r.headers.get("X-ProxyMQ-Error", "") for _, r in today}),
    }


def healthz(session: requests.Session, gateway: str) -> float:
    """The gateway's floor on this machine now: its cheapest answer, same connection."""
    started = time.perf_counter()
    session.get(gateway + "/healthz", timeout=30)
    return time.perf_counter() - started


def submit_job(url: str) -> tuple[float, str, str]:
    """(submitted at, correlation id, location)."""
    at = time.time()
    response = requests.post(url, data=b"x", headers={"Prefer": "respond-async"}, timeout=30)
    response.raise_for_status()
    return at, response.headers["X-Correlation-ID"], response.headers["Location"]


def backlog(args, gateway: str, service: str, downstream: Downstream) -> dict:
    url = f"{gateway}/{service}/work"
    jobs = round(args.backlog_s * 1000 / args.cost_ms)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: submit_job(url), range(jobs)))
    queued_at = time.monotonic()
    short = {"X-ProxyMQ-Timeout": "5"}
    support.wait_for(
        lambda: timed_post(url, short)[1].status_code == 503, args.backlog_s, "backlog known"
    )
    known_after = time.monotonic() - queued_at
    short_times, short_codes, floor = [], [], []
    session = requests.Session()  # keep-alive, as for the breaker's requests
    for _ in range(args.requests):
        started = time.perf_counter()
        response = session.post(url, data=b"x", headers=short, timeout=30)
        took = time.perf_counter() - started
        floor.append(healthz(session, gateway))
        short_times.append(took)
        short_codes.append(response.headers.get("X-ProxyMQ-Error", str(response.status_code)))
    # The estimate's error: a job a second while the backlog drains.
    estimates: list[tuple[float, float, str]] = []  # (submitted at, eta, correlation id)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        long = {"X-ProxyMQ-Timeout": "60"}
        served = [pool.submit(timed_post, url, long) for _ in range(args.long_requests)]
        for _ in range(int(args.backlog_s * 0.6)):
            at, correlation_id, location = submit_job(url)
            polled = requests.get(gateway + location, timeout=30).json()
            if "eta_seconds" in polled:
                estimates.append((at, polled["eta_seconds"], correlation_id))
            time.sleep(1)
        long_results = [f.result() for f in served]
    support.wait_for(
        lambda: all(cid in downstream.arrivals for _, _, cid in estimates),
        args.backlog_s * 3,
        "tracked jobs started",
    )
    signed = [eta - (downstream.arrivals[cid] - at) for at, eta, cid in estimates]
    errors = [abs(e) for e in signed]
    return {
        "backlog_jobs": jobs,
        "state_known_after_s": known_after,
        "short_deadline": {
            "requests": len(short_codes),
            "deadline_unreachable": short_codes.count("deadline-unreachable"),
            "p50_ms": percentile(short_times, 0.5) * 1000,
            "p99_ms": percentile(short_times, 0.99) * 1000,
            "within_10ms": sum(t < 0.010 for t in short_times),
            "healthz_p50_ms": percentile(floor, 0.5) * 1000,
            "healthz_p99_ms": percentile(floor, 0.99) * 1000,
        },
        "long_deadline": {
            "requests": len(long_results),
            "served_200": sum(r.status_code == 200 for _, r in long_results),
            "median_s": statistics.median(t for t, _ in long_results),
        },
        "estimate_error": {
            "jobs": len(errors),
            "median_s": statistics.median(errors) if errors else None,
            "p90_s": percentile(errors, 0.9) if errors else None,
            "signed_s": [round(e, 2) for e in signed],
            "mean_actual_wait_s": statistics.mean(
                downstream.arrivals[cid] - at for at, _, cid in estimates
            )
            if estimates
            else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-ms", type=float, default=50.0)
    parser.add_argument("--backlog-s", type=float, default=30.0)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--long-requests", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.broker_url = support.BROKER_URL  # PROXYMQ_TEST_BROKER_URL, as for the tests
    stack = support.Stack(Path(tempfile.mkdtemp(prefix="proxymq-failfast-")))
    print(f"logs: {stack.dir}", flush=True)
    downstream = Downstream(args.cost_ms / 1000)
    service = f"ffbench{uuid.uuid4().hex[:6]}"
    try:
        gateway = stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL).url
        stack.worker(service, downstream.url, "-c", "4", PROXYMQ_RESULT_URL=RESULT_URL)
        support.wait_for(
            lambda: timed_post(f"{gateway}/{service}/x")[1].status_code == 200, 60, "ready"
        )
        results = {
            "cost_ms": args.cost_ms,
            "breaker_open": breaker_open(args, gateway),
            "backlog": backlog(args, gateway, service, downstream),
        }
    finally:
        stack.stop()
        support.delete_queues(f"{service}_requests", f"{service}_requests.dead")
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

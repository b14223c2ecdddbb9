"""Flow control measured: a service of capacity C calls at once, 429 beyond.

``.venv/bin/python bench/flow.py`` (from the repository root, RabbitMQ and Redis on
localhost, ``wrk`` installed) runs, each on a fresh stack (the stub, ``gunicorn
gateway:app``, ``--workers`` workers ``-c --threads``), ``wrk -c --clients`` against the
gateway for ``--duration`` seconds:

- **none**: no limit, the baseline: the share of client-visible errors (the stub's 429s);
- **cap**: ``PROXYMQ_MAX_CONCURRENCY=C``: 429s (target 0) and throughput over
  C ÷ delay (target ≥ 0.9);
- **auto**: ``PROXYMQ_MAX_CONCURRENCY=auto``: errors (target ≤ 1 %), throughput over
  capacity (target ≥ 0.85), and the limit sampled from Redis twice a second while the
  stub's capacity is halved and restored mid-run (``--phases``; the capacity is then
  its mean over the run);
- **burst**: the cap with ``--burst-clients`` (2,000) connections at once on one gateway
  process: every answer must be a 200 (wrk's timeout 120 s), and the gateway's RSS
  growth over the number of requests waiting is its memory per waiting request.

Every scenario reports the gateway's RSS before the load and its peak during it.

``bench/flow.py stub --port P --capacity C --delay S`` runs the stub alone
(docs/flow-control.md's walk-through): ``GET /stats`` counts, ``/capacity/<n>`` changes C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import redis
import resources
from load import run_wrk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import support  # the tests' harness: processes, readiness, ports

REDIS_URL = "redis://127.0.0.1:6379/0"


# -- the stub ---------------------------------------------------------------------------------


class Capacity:
    def __init__(self, capacity: int, delay: float) -> None:
        self.capacity, self.delay = capacity, delay
        self.in_flight = self.max_in_flight = self.calls = self.refused = 0
        self.refused_at: list[float] = []  # monotonic times (one clock for every process)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                length = next(
                    (int(v) for n, _, v in (x.partition(":") for x in lines[1:])
                     if n.lower() == "content-length"),
                    0,
                )  # fmt: skip
                if length:
                    await reader.readexactly(length)
                status, body = await self.answer(path)
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def answer(self, path: str) -> tuple[int, bytes]:
        if path == "/stats":
            keys = ("calls", "refused", "max_in_flight", "refused_at")
            stats = {k: getattr(self, k) for k in keys}
            return 200, json.dumps(stats).encode()
        if path.startswith("/capacity/"):
            self.capacity = int(path.rsplit("/", 1)[1])
            return 200, b"ok"
        self.calls += 1
        if self.in_flight >= self.capacity:
            self.refused += 1
            self.refused_at.append(time.monotonic())
            return 429, b"busy"
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return 200, b"ok"


def serve_stub(port: int, capacity: int, delay: float) -> None:
    async def main() -> None:
        stub = Capacity(capacity, delay)
        server = await asyncio.start_server(stub.handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- a scenario -------------------------------------------------------------------------------


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def scenario(args: argparse.Namespace, name: str, worker_env: dict[str, str]) -> dict:
    run = support.Stack(Path(tempfile.mkdtemp(prefix=f"proxymq-flow-{name}-")))
    log_dir = run.dir
    service = f"flow{uuid.uuid4().hex[:8]}"
    broker = {"PROXYMQ_BROKER_URL": args.broker_url}
    try:
        stub_port, gateway_port = support.free_port(), support.free_port()
        stub = run.run(
            "stub",
            [sys.executable, "bench/flow.py", "stub", "--port", str(stub_port),
             "--capacity", str(args.capacity), "--delay", str(args.delay)],
            **broker,
        )  # fmt: skip
        stub_url = f"http://127.0.0.1:{stub_port}"
        support.await_ready(lambda: get(stub_url + "/stats"), [stub], "stub")
        gateway = run.run(
            "gateway",
            ["gunicorn", "gateway:app", "-w", "1"],
            PROXYMQ_GATEWAY_BIND=f"127.0.0.1:{gateway_port}",
            **broker,
        )
        workers = []
        for index in range(args.workers):
            env = dict(
                broker,
                PROXYMQ_SERVICE=service,
                PROXYMQ_DOWNSTREAM_URL=stub_url,
                PROXYMQ_WORKER_METRICS_PORT=str(support.free_port()),
                PROXYMQ_RESULT_URL=REDIS_URL,
                PROXYMQ_TASK_EVENTS="false",
                **worker_env,
            )
            command = ["celery", "-A", "workers", "worker"]
            command += ["-Q", f"{service}_requests", "-c", str(args.threads)]
            command += ["-n", f"flow{index}-{uuid.uuid4().hex[:6]}@%h", "--without-mingle"]
            workers.append(run.run("worker", command, **env))
        url = f"http://127.0.0.1:{gateway_port}/{service}/work"
        support.await_ready(
            lambda: urllib.request.urlopen(url, b"x", timeout=10).status == 200,
            [gateway, *workers],
            "gateway path",
            timeout=60,
        )
        limits: list[tuple[float, float]] = []
        done = threading.Event()
        if worker_env.get("PROXYMQ_MAX_CONCURRENCY") == "auto" and args.phases:
            threading.Thread(target=sample_limit, args=(service, limits, done), daemon=True).start()
            threading.Thread(target=change_capacity, args=(stub_url, args), daemon=True).start()
        before = json.loads(get(stub_url + "/stats"))
        idle_rss = resources.tree_rss_bytes(gateway.pid)
        peak = [idle_rss]
        threading.Thread(target=sample_rss, args=(gateway.pid, peak, done), daemon=True).start()
        clients = args.burst_clients if name == "burst" else args.clients
        started = time.monotonic()
        load = run_wrk(url, clients, args.duration, timeout_s=120)
        done.set()
        after = json.loads(get(stub_url + "/stats"))
        capacity_rps = args.capacity / args.delay
        if limits:  # C was halved for a third of the run: the capacity is its mean
            capacity_rps = (2 * args.capacity + max(1, args.capacity // 2)) / 3 / args.delay
        return {
            "scenario": name,
            "rps": load.rps,
            "requests": load.requests,
            "client_errors": load.errors,
            "error_share": load.errors / max(1, load.requests),
            "of_capacity": load.rps / capacity_rps,
            "stub_refused": after["refused"] - before["refused"],
            "stub_max_in_flight": after["max_in_flight"],
            "refused_per_second": refused_per_second(after["refused_at"], started, args.duration),
            "clients": clients,
            "gateway_rss_idle_mb": round(idle_rss / 2**20, 1),
            "gateway_rss_peak_mb": round(max(peak) / 2**20, 1),
            "gateway_rss_per_waiting_kb": round(
                (max(peak) - idle_rss) / 1024 / max(1, clients - args.capacity), 1
            ),
            "limit_samples": limits,
            "logs": str(log_dir),
        }
    finally:
        run.stop()


def refused_per_second(times: list[float], started: float, duration: float) -> list[int]:
    """The stub's 429s in each second of the load: where a scenario's errors come from."""
    counts = [0] * (int(duration) + 1)
    for at in times:
        if 0 <= at - started < len(counts):
            counts[int(at - started)] += 1
    return counts


def sample_rss(pid: int, peak: list[int], done: threading.Event) -> None:
    while not done.is_set():
        peak.append(resources.tree_rss_bytes(pid))
        time.sleep(0.25)


def sample_limit(service: str, samples: list, done: threading.Event) -> None:
    store = redis.Redis.from_url(REDIS_URL)
    started = time.monotonic()
    while not done.is_set():
        value = store.hget(f"proxymq:flow:{{{service}}}:auto", "limit")
        if value is not None:
            samples.append((round(time.monotonic() - started, 1), round(float(value), 2)))
        time.sleep(0.5)


def change_capacity(stub_url: str, args: argparse.Namespace) -> None:
    """Halve the stub's capacity at a third of the run, restore it at two thirds."""
    time.sleep(args.duration / 3)
    get(f"{stub_url}/capacity/{max(1, args.capacity // 2)}")
    time.sleep(args.duration / 3)
    get(f"{stub_url}/capacity/{args.capacity}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="measure", choices=["measure", "stub"])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--burst-clients", type=int, default=2000)
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--scenarios", default="none,cap,auto")
    parser.add_argument("--phases", action="store_true", help="auto: halve C mid-run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args(argv)
    if args.command == "stub":
        serve_stub(args.port, args.capacity, args.delay)
        return 0
    settings = {
        "none": {},
        "cap": {"PROXYMQ_MAX_CONCURRENCY": str(args.capacity)},
        "auto": {"PROXYMQ_MAX_CONCURRENCY": "auto"},
        "burst": {"PROXYMQ_MAX_CONCURRENCY": str(args.capacity)},
    }
    results = []
    for name in args.scenarios.split(","):
        result = scenario(args, name, settings[name])
        results.append(result)
        shown = {k: v for k, v in result.items() if k not in ("limit_samples", "logs")}
        print(json.dumps(shown))
        if result["limit_samples"]:
            print("  limit over time (s, limit):", result["limit_samples"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

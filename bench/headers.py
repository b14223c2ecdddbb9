"""Large request heads: ``.venv/bin/python bench/headers.py [options]`` from the repository root.

One run: the stub downstream, one gateway process and a worker. It measures what a large
head costs the gateway: how long it takes to refuse an 8 MiB header flood (one connection
sending 1000-byte header lines until the gateway answers or hangs up), the gateway's CPU
for it and the slowest ``/healthz`` answered meanwhile; and the latency of ordinary
requests with a small head, one 20 KiB header, and 30 KiB of headers in all (both within
the default ``PROXYMQ_MAX_HEADER_BYTES``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import resources
import rpc_loop
from run import DEFAULT_BROKER_URL, READY_TIMEOUT, http_status

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import support  # the tests' harness: processes, readiness, ports

FLOOD_LINE = b"X-Flood: " + b"f" * 989 + b"\r\n"  # 1000 bytes
HEADER_SETS = {
    "small head": {"X-Small": "s" * 100},
    "one 20 KiB header": {"Authorization": "t" * 20 * 1024},
    "30 KiB in all": {f"X-Part-{n}": "p" * (6 * 1024 - 16) for n in range(5)},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floods", type=int, default=3, help="8 MiB floods, one at a time")
    parser.add_argument("--requests", type=int, default=50, help="requests per header set")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--json", type=Path, help="write every number here")
    return parser.parse_args(argv)


def flood(port: int) -> tuple[float, bytes]:
    """Seconds from the first byte of an 8 MiB head to the gateway's answer or hang-up."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /bench/x HTTP/1.1\r\nHost: a\r\n")
        try:
            for _ in range(8 * 1024):
                sock.sendall(FLOOD_LINE)
        except OSError:
            pass  # the gateway stopped reading
        try:
            answer = sock.recv(64)
        except OSError:
            answer = b""
    return time.monotonic() - started, answer.split(b"\r\n", 1)[0]


def measure_floods(port: int, gateway_pid: int, count: int) -> dict:
    stop, health = threading.Event(), []

    def check_health() -> None:
        while not stop.is_set():
            started = time.monotonic()
            http_status(f"http://127.0.0.1:{port}/healthz")
            health.append(time.monotonic() - started)

    checker = threading.Thread(target=check_health)
    cpu_before = resources.tree_cpu_seconds(gateway_pid)
    checker.start()
    try:
        results = [flood(port) for _ in range(count)]
    finally:
        stop.set()
        checker.join()
    cpu = resources.tree_cpu_seconds(gateway_pid) - cpu_before
    return {
        "seconds": [round(seconds, 3) for seconds, _ in results],
        "answers": sorted({answer.decode("latin-1") for _, answer in results}),
        "gateway_cpu_s_per_flood": round(cpu / count, 3),
        "slowest_healthz_s": round(max(health), 3) if health else None,
    }


def measure_heads(port: int, service: str, count: int) -> dict:
    results = {}
    for name, headers in HEADER_SETS.items():
        latencies, statuses = [], set()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(count):
            started = time.monotonic()
            connection.request("GET", f"/{service}/x", headers=headers)
            response = connection.getresponse()
            response.read()
            latencies.append(time.monotonic() - started)
            statuses.add(response.status)
            if response.will_close:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.close()
        latencies.sort()
        results[name] = {
            "statuses": sorted(statuses),
            "median_ms": round(statistics.median(latencies) * 1000, 2),
            "p90_ms": round(latencies[int(len(latencies) * 0.9) - 1] * 1000, 2),
        }
    return results


def run(args: argparse.Namespace, stack: support.Stack) -> dict:
    def env(**extra: str) -> dict[str, str]:
        return {"PROXYMQ_BROKER_URL": args.broker_url, **extra}

    service = f"benchhead{uuid.uuid4().hex[:6]}"
    queue = f"{service}_requests"
    stub_port, gateway_port = support.free_port(), support.free_port()
    stub = stack.run("stub", [sys.executable, "bench/stub.py", "--port", str(stub_port)], **env())
    gateway = stack.run(
        "gateway",
        ["gunicorn", "gateway:app", "-w", "1"],
        **env(PROXYMQ_GATEWAY_BIND=f"127.0.0.1:{gateway_port}"),
    )
    worker = stack.run(
        "worker",
        [
            *("celery", "-A", "workers", "worker", "-Q", queue),
            *("-n", f"{service}@%h", "--without-mingle", "--without-gossip"),
        ],
        **env(
            PROXYMQ_SERVICE=service,
            PROXYMQ_DOWNSTREAM_URL=f"http://127.0.0.1:{stub_port}",
            PROXYMQ_WORKER_METRICS_PORT=str(support.free_port()),
        ),
    )
    watched = [stub, gateway, worker]
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    support.await_ready(
        lambda: http_status(gateway_url + "/readyz") == 200, watched, "gateway", READY_TIMEOUT
    )
    support.await_ready(
        lambda: rpc_loop.consumer_count(args.broker_url, queue) >= 1,
        watched,
        "worker consuming",
        READY_TIMEOUT,
    )
    measure_heads(gateway_port, service, 5)  # warm-up
    try:
        return {
            "flood": measure_floods(gateway_port, gateway.pid, args.floods),
            "heads": measure_heads(gateway_port, service, args.requests),
        }
    finally:
        delete_queue(args.broker_url, queue)


def delete_queue(url: str, queue: str) -> None:
    """The run's service queue (made by its worker) goes with the run."""
    connection = rpc_loop.connect(url)
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="proxymq-bench-headers-"))
    stack = support.Stack(log_dir)
    load1, load5, _ = os.getloadavg()
    print(f"## large heads: {os.cpu_count()} CPUs, load {load1:.2f}/{load5:.2f}", flush=True)
    try:
        result = run(args, stack)
    except support.StartError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Streaming benchmark: ``.venv/bin/python bench/stream.py [options]`` from the repository root.

One run: an SSE stub (``bench/sse_stub.py``: ``--events`` events ``--gap-ms`` apart, each
stamped with the stub's ``time.monotonic_ns()`` when written), the real gateway and
worker, and a raw-socket client reading the same stream directly from the stub and
through the gateway, alternately, ``--rounds`` times. For every event it takes the delay
from the stub's write to the client's read; the gateway's extra delay for an event is its
delay through the gateway minus the same event's delay on the direct connection of the
same round. Also time to first byte (request sent to the head, and to the first event)
and the spread of inter-arrival gaps. See bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import rpc_loop
from run import DEFAULT_BROKER_URL, READY_TIMEOUT, http_status, log_problems, signals_interrupt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import support  # the tests' harness: processes, readiness, ports


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50, help="events per stream")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="ms between events")
    parser.add_argument("--rounds", type=int, default=10, help="direct + gateway streams each")
    parser.add_argument(
        "--parallel", type=int, default=1, help="streams at once, each direct and via gateway"
    )
    parser.add_argument("--service", default="benchsse", help="service name")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    return parser.parse_args(argv)


# -- the client -----------------------------------------------------------------------------


@dataclass
class Stream:
    """One stream as the client saw it; times are monotonic nanoseconds."""

    sent_at: int = 0
    head_at: int | None = None
    status: int | None = None
    # event number -> (stub's write time, client's read time)
    events: dict[int, tuple[int, int]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    clean_end: bool = False
    error: str | None = None

    def first_event_at(self) -> int | None:
        return min((read for _, read in self.events.values()), default=None)


def read_stream(host: str, port: int, path: str, timeout: float = 30) -> Stream:
    """GET ``path`` on a new connection; parse the chunked body as it arrives."""
    stream = Stream()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
            stream.sent_at = time.monotonic_ns()
            sock.sendall(request.encode())
            buffer, body, in_head = b"", b"", True
            while True:
                data = sock.recv(65536)
                now = time.monotonic_ns()
                if not data:
                    return stream
                buffer += data
                if in_head:
                    if b"\r\n\r\n" not in buffer:
                        continue
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    stream.head_at, stream.status = now, int(head.split(b" ", 2)[1])
                    in_head = False
                # chunks: size line, data, CRLF; the last one has size 0
                while b"\r\n" in buffer:
                    size_line, rest = buffer.split(b"\r\n", 1)
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        stream.clean_end = True
                        break
                    if len(rest) < size + 2:
                        break
                    body, buffer = body + rest[:size], rest[size + 2 :]
                while b"\n\n" in body:
                    event, body = body.split(b"\n\n", 1)
                    if event.startswith(b"data: "):
                        number, written = event[6:].split()
                        stream.events[int(number)] = (int(written), now)
                        stream.order.append(int(number))
                if stream.clean_end:
                    return stream
    except (OSError, ValueError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
        return stream


def read_many(host: str, port: int, path: str, count: int) -> list[Stream]:
    if count == 1:
        return [read_stream(host, port, path)]
    results: list[Stream | None] = [None] * count

    def one(index: int) -> None:
        results[index] = read_stream(host, port, path)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None]


# -- numbers --------------------------------------------------------------------------------


def ms(nanoseconds: float) -> float:
    return nanoseconds / 1e6


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "median": pct(values, 0.5),
        "p90": pct(values, 0.9),
        "p99": pct(values, 0.99),
        "max": max(values) if values else float("nan"),
    }


def analyse(pairs: list[tuple[Stream, Stream]], events: int, gap_ms: float) -> dict:
    """``pairs``: (direct, via gateway) streams of the same round."""
    extra, delay_direct, delay_gateway = [], [], []
    ttfb_head, ttfb_event = {"direct": [], "gateway": []}, {"direct": [], "gateway": []}
    jitter = {"direct": [], "gateway": []}
    problems = {
        f"{what}_{name}": 0
        for what in ("missing", "out_of_order", "unclean_end", "errors")
        for name in ("direct", "gateway")
    }
    for direct, gateway in pairs:
        for name, stream in (("direct", direct), ("gateway", gateway)):
            if stream.error or stream.status != 200:
                problems[f"errors_{name}"] += 1
                continue
            problems[f"missing_{name}"] += events - len(stream.events)
            problems[f"out_of_order_{name}"] += stream.order != sorted(stream.order)
            problems[f"unclean_end_{name}"] += not stream.clean_end
            if stream.head_at is not None:
                ttfb_head[name].append(ms(stream.head_at - stream.sent_at))
            first = stream.first_event_at()
            if first is not None:
                ttfb_event[name].append(ms(first - stream.sent_at))
            reads = [stream.events[n][1] for n in sorted(stream.events)]
            jitter[name] += [abs(ms(b - a) - gap_ms) for a, b in itertools.pairwise(reads)]
        for number, (written, read) in gateway.events.items():
            delay_gateway.append(ms(read - written))
            if number in direct.events:
                d_written, d_read = direct.events[number]
                delay_direct.append(ms(d_read - d_written))
                extra.append(ms(read - written) - ms(d_read - d_written))
    return {
        "per_event_extra_ms": summary(extra),
        "event_delay_direct_ms": summary(delay_direct),
        "event_delay_gateway_ms": summary(delay_gateway),
        "ttfb_head_ms": {k: summary(v) for k, v in ttfb_head.items()},
        "ttfb_first_event_ms": {k: summary(v) for k, v in ttfb_event.items()},
        "inter_arrival_jitter_ms": {k: summary(v) for k, v in jitter.items()},
        "problems": problems,
    }


def report(result: dict, args: argparse.Namespace) -> str:
    def row(label: str, s: dict) -> str:
        return (
            f"| {label} | {s['n']} | {s['median']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} "
            f"| {s['max']:.2f} |"
        )

    lines = [
        f"{args.rounds} rounds x {args.parallel} stream(s) of {args.events} events "
        f"{args.gap_ms:g} ms apart, direct and through the gateway",
        "",
        "| ms | n | median | p90 | p99 | max |",
        "|---|---|---|---|---|---|",
        row("per-event extra delay (gateway - direct)", result["per_event_extra_ms"]),
        row("event delay, direct (stub write → client read)", result["event_delay_direct_ms"]),
        row("event delay, gateway", result["event_delay_gateway_ms"]),
        row("time to head, direct", result["ttfb_head_ms"]["direct"]),
        row("time to head, gateway", result["ttfb_head_ms"]["gateway"]),
        row("time to first event, direct", result["ttfb_first_event_ms"]["direct"]),
        row("time to first event, gateway", result["ttfb_first_event_ms"]["gateway"]),
        row("gap deviation, direct", result["inter_arrival_jitter_ms"]["direct"]),
        row("gap deviation, gateway", result["inter_arrival_jitter_ms"]["gateway"]),
        "",
        "problems (events missing; streams out of order, not cleanly ended, failed): "
        + json.dumps(result["problems"]),
    ]
    target = result["per_event_extra_ms"]["median"]
    verdict = "met" if target <= 5 else "missed"
    lines.append(f"target (median per-event extra delay <= 5 ms): {verdict} ({target:.2f} ms)")
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, stack: support.Stack) -> dict:
    def env(**extra: str) -> dict[str, str]:
        return {"PROXYMQ_BROKER_URL": args.broker_url, **extra}

    stub_port, gateway_port = support.free_port(), support.free_port()
    stub = stack.run(
        "sse-stub", [sys.executable, "bench/sse_stub.py", "--port", str(stub_port)], **env()
    )
    support.await_ready(
        lambda: http_status(f"http://127.0.0.1:{stub_port}/") == 200, [stub], "sse stub", 20
    )
    gateway = stack.run(
        "gateway",
        ["gunicorn", "gateway:app", "-w", "1"],
        **env(PROXYMQ_GATEWAY_BIND=f"127.0.0.1:{gateway_port}"),
    )
    queue = f"{args.service}_requests"
    node = f"benchsse-{uuid.uuid4().hex[:6]}@%h"
    worker = stack.run(
        "worker",
        [
            *("celery", "-A", "workers", "worker", "-Q", queue, "-n", node),
            *("--without-mingle", "--without-gossip"),
        ],
        **env(
            PROXYMQ_SERVICE=args.service,
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
    path = f"/sse?events={args.events}&gap_ms={args.gap_ms:g}"
    gateway_path = f"/{args.service}{path}"
    probe = "/sse?events=2&gap_ms=1"
    support.await_ready(
        lambda: read_stream("127.0.0.1", gateway_port, f"/{args.service}{probe}").status == 200,
        watched,
        "a stream through the gateway",
        READY_TIMEOUT,
    )
    # warm-up: one of each, not counted
    read_stream("127.0.0.1", stub_port, path)
    read_stream("127.0.0.1", gateway_port, gateway_path)
    pairs = []
    for _ in range(args.rounds):
        direct = read_many("127.0.0.1", stub_port, path, args.parallel)
        via = read_many("127.0.0.1", gateway_port, gateway_path, args.parallel)
        pairs += list(zip(direct, via, strict=True))
    return analyse(pairs, args.events, args.gap_ms)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="proxymq-bench-stream-"))
    stack = support.Stack(log_dir)
    load1, load5, _ = os.getloadavg()
    print(
        f"## ProxyMQ streaming benchmark: {os.cpu_count()} CPUs, "
        f"load average {load1:.2f}/{load5:.2f} at start",
        flush=True,
    )
    print(f"logs: {log_dir}", flush=True)
    try:
        with signals_interrupt():
            result = run(args, stack)
    except KeyboardInterrupt:
        print("interrupted; stopping the stack", file=sys.stderr)
        return 130
    except support.StartError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    problems = log_problems(log_dir)
    print(report(result, args))
    print("\nlog problems: " + ("; ".join(problems) if problems else "none"))
    if args.json:
        result["options"] = {k: str(v) for k, v in vars(args).items()}
        result["log_problems"] = problems
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How throughput grows with gateway processes, workers and RabbitMQ nodes: a script.

``.venv/bin/python bench/scaling.py [--duration 8] [--json PATH]`` from the repository
root (RabbitMQ on 127.0.0.1:5672, wrk installed; about 5 minutes).

Each configuration gets fresh processes (bench/run.py's ``Stack``: the stub downstream,
``gunicorn gateway:app -w G``, W Celery workers), a warm-up, then wrk at ``--concurrency``
on the gateway. Besides requests per second it reports the CPU each part spent per
request, RabbitMQ's included (the Erlang VMs of the broker in use), because on a small
machine the sum is what caps throughput. Configurations, in this order:

1. the machine's RabbitMQ, a classic queue: G x W = 1x1 (the baseline), 2x1, 1x2, 2x2;
2. a three-node cluster of the script's own (tests/support's ``PrivateCluster``), 2x2,
   the workers on node 0 (they declare the queue, so a quorum queue's leader is there):
   a classic queue, a quorum queue with the gateways on node 0 too, and a quorum queue
   with the gateways on node 1 (each request then crosses nodes on its way in);
3. the baseline again: how far the machine drifted during the run.

Every figure worth quoting is a ratio to the baseline of the same run (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import resources
import run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import support  # the tests' own harness (and cluster), not a copy of it

LOCAL = "amqp://guest:guest@127.0.0.1:5672//"


@dataclass(frozen=True)
class Config:
    name: str
    gateway_procs: int
    workers: int
    worker_url: str = LOCAL  # the workers declare the queue: its leader is their node
    gateway_url: str | None = None  # None: the workers' node
    quorum: bool = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=64, help="wrk -c")
    parser.add_argument("--no-cluster", action="store_true", help="single node only")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    return parser.parse_args(argv)


def broker_pids(url: str) -> list[int]:
    """The Erlang VM listening on ``url``'s port: the machine's RabbitMQ (a private
    cluster's nodes are known by their PID files)."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "beam.smp":
            continue
        try:
            if any(c.laddr.port == port for c in process.net_connections("tcp")):
                return [process.pid]
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    raise RuntimeError(f"no beam.smp listens on port {port}")


def cpu_of(pids: list[int]) -> float:
    return sum(resources.tree_cpu_seconds(pid) for pid in pids)


def measure(config: Config, options: argparse.Namespace, broker: list[int], logs: Path) -> dict:
    service = f"scale{uuid.uuid4().hex[:6]}"
    argv = ["--gateway-procs", str(config.gateway_procs), "--workers", str(config.workers)]
    argv += ["--broker-url", config.worker_url, "--service", service, "--warmup", "2"]
    argv += ["--duration", str(options.duration)]
    if config.quorum:
        argv += ["--worker-env", "PROXYMQ_QUEUE_TYPE=quorum"]
    args = run.parse_args(argv)
    log_dir = logs / f"{len(list(logs.iterdir())):02d}"
    log_dir.mkdir()
    stack = run.Stack(args, support.Stack(log_dir))
    try:
        stack.start_stub(cost_model=False)
        stack.start_workers(dict(args.worker_env))
        args.broker_url = config.gateway_url or config.worker_url  # Stack reads it per start
        stack.start_gateway()
        stack.wait_path_ready()
        run.wrk(stack, stack.service_url, options.concurrency, args.warmup)
        stack.wait_stub_quiet()
        trees = {"gateway": [stack.gateway], "worker": stack.workers}
        broker_before = cpu_of(broker)
        result = run.measured(
            trees, lambda: run.wrk(stack, stack.service_url, options.concurrency, args.duration)
        )
        broker_s = cpu_of(broker) - broker_before
    finally:
        stack.procs.stop()
    per_request = 1000 / result.load.requests if result.load.requests else float("nan")
    return {
        "config": config.name,
        "rps": result.load.rps,
        "p50_ms": result.load.p50_ms,
        "p99_ms": result.load.p99_ms,
        "errors": result.load.errors,
        "cpu_ms_per_request": {
            "gateway": result.cpu_s["gateway"] * per_request,
            "worker": result.cpu_s["worker"] * per_request,
            "rabbitmq": broker_s * per_request,
        },
    }


def report(rows: list[dict], baseline: float) -> str:
    lines = [
        "| configuration | req/s | ÷ baseline | p50 ms | p99 ms | CPU ms/req gateway | worker"
        " | RabbitMQ | sum |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cpu = row["cpu_ms_per_request"]
        lines.append(
            f"| {row['config']} | {row['rps']:.0f} | {row['rps'] / baseline:.2f} "
            f"| {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {cpu['gateway']:.2f} "
            f"| {cpu['worker']:.2f} | {cpu['rabbitmq']:.2f} | {sum(cpu.values()):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="proxymq-scaling-"))
    print(f"logs: {logs}", flush=True)
    local = broker_pids(LOCAL)
    single = [
        Config("1 node classic, 1 gateway x 1 worker", 1, 1),
        Config("1 node classic, 2 gateways x 1 worker", 2, 1),
        Config("1 node classic, 1 gateway x 2 workers", 1, 2),
        Config("1 node classic, 2 gateways x 2 workers", 2, 2),
    ]
    rows = [measure(config, options, local, logs) for config in single]
    if not options.no_cluster:
        cluster = support.PrivateCluster(3)
        try:
            cluster.start()
            nodes = [node.vm_pid for node in cluster.nodes]
            first, second = cluster.nodes[0].url, cluster.nodes[1].url
            for config in (
                Config("3 nodes classic, 2 x 2, all on node 0", 2, 2, first),
                Config(
                    "3 nodes quorum, 2 x 2, all on node 0 (the leader's)", 2, 2, first, None, True
                ),
                Config("3 nodes quorum, 2 x 2, gateways on node 1", 2, 2, first, second, True),
            ):
                rows.append(measure(config, options, nodes, logs))
        finally:
            cluster.remove()
    again = measure(single[0], options, local, logs)
    again["config"] += " (again, at the end)"
    rows.append(again)
    baseline = rows[0]["rps"]
    print(report(rows, baseline))
    if options.json:
        options.json.write_text(json.dumps({"rows": rows, "at": time.time()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

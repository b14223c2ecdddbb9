"""ProxyMQ benchmark: ``.venv/bin/python bench/run.py [options]`` from the repository root.

Starts a fast stub downstream, the real gateway (``gunicorn gateway:app``) and worker
(``celery -A workers worker``) and a bare RPC loop, drives each with the same closed-loop
load, and prints markdown tables. Every number worth comparing is a ratio measured in the
same run: the machine is shared and noisy. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import load
import report
import resources
import rpc_loop
from load import LoadResult

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import support  # the tests' harness: processes, readiness, ports

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
COMPARE_CONCURRENCY = (64, 1)
BATCH_ENV = {"PROXYMQ_BATCH_URL": "{stub}/batch", "PROXYMQ_BATCH_SIZE": "16"}
PROBE_BODY = b'{"probe": true}'
READY_TIMEOUT = 60  # seconds for a process to answer; the machine is loaded
SIGNALS = (signal.SIGTERM, signal.SIGINT)


# -- options --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=_int_list, default=[1, 16, 64], help="e.g. 1,16,64")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per target")
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        help="measure everything N times; report the median round",
    )
    parser.add_argument("--gateway-procs", type=int, default=1, help="gunicorn -w")
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes")
    parser.add_argument("--service", default="bench", help="service name (queue <name>_requests)")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--mode", choices=["single", "batch"], default="single")
    parser.add_argument("--compare-batch", action="store_true", help="single vs batch worker")
    parser.add_argument("--cost-ms", type=float, default=5.0, help="cost-model stub, per call")
    parser.add_argument("--cost-per-item-ms", type=float, default=0.1, help="... per item")
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="extra worker environment, repeatable; '{stub}' is the stub's base URL",
    )
    parser.add_argument("--wrk-timeout", type=float, default=10.0, help="wrk --timeout seconds")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results")
    args = parser.parse_args(argv)
    if args.duration < 1 or min(args.concurrency) < 1:
        parser.error("--duration and every --concurrency must be >= 1")
    return args


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


# -- small HTTP helpers (stdlib: no client library's cost in readiness checks) --------------


def http_status(url: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    if body:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def stub_stats(stub_url: str) -> dict[str, int]:
    with urllib.request.urlopen(stub_url + "/_stub/stats", timeout=5) as answer:
        return json.loads(answer.read())


# -- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    """The processes of one run and how to reach them."""

    args: argparse.Namespace
    procs: support.Stack
    stub: support.Process | None = None
    stub_url: str = ""
    gateway: support.Process | None = None
    gateway_url: str = ""
    workers: list[support.Process] = field(default_factory=list)
    responder: support.Process | None = None
    responder_queue: str = ""

    @property
    def queue(self) -> str:
        return f"{self.args.service}_requests"

    @property
    def service_url(self) -> str:
        return f"{self.gateway_url}/{self.args.service}/echo"

    @property
    def floor_service(self) -> str:
        return f"{self.args.service}floor"

    @property
    def floor_url(self) -> str:
        return f"{self.gateway_url}/{self.floor_service}/echo"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a process gets on top of ``support.base_env``: this run's broker."""
        return {"PROXYMQ_BROKER_URL": self.args.broker_url, **extra}

    def start_stub(self, cost_model: bool) -> None:
        port = support.free_port()
        command = [sys.executable, "bench/stub.py", "--port", str(port)]
        if cost_model:
            command += ["--cost-ms", str(self.args.cost_ms)]
            command += ["--cost-per-item-ms", str(self.args.cost_per_item_ms)]
        self.stub = self.procs.run("stub", command, **self.env())
        self.stub_url = f"http://127.0.0.1:{port}"
        support.await_ready(lambda: stub_stats(self.stub_url) is not None, [self.stub], "stub", 20)

    def start_gateway(self) -> None:
        """Start gunicorn; readiness is awaited in ``wait_path_ready``."""
        port = support.free_port()
        command = ["gunicorn", "gateway:app", "-w", str(self.args.gateway_procs)]
        env = self.env(PROXYMQ_GATEWAY_BIND=f"127.0.0.1:{port}")
        self.gateway = self.procs.run("gateway", command, **env)
        self.gateway_url = f"http://127.0.0.1:{port}"

    def start_workers(self, extra_env: dict[str, str]) -> None:
        """Start ``--workers`` Celery workers; each needs its own node name and metrics
        port, or a second one would clash with the first."""
        for index in range(self.args.workers):
            node = f"bench{index}-{uuid.uuid4().hex[:6]}@%h"
            command = ["celery", "-A", "workers", "worker", "-Q", self.queue]
            command += ["--without-mingle", "--without-gossip", "-n", node]
            env = self.env(
                PROXYMQ_SERVICE=self.args.service,
                PROXYMQ_DOWNSTREAM_URL=self.stub_url,
                PROXYMQ_WORKER_METRICS_PORT=str(support.free_port()),
                **{key: value.replace("{stub}", self.stub_url) for key, value in extra_env.items()},
            )
            self.workers.append(self.procs.run("worker", command, **env))

    def stop_workers(self) -> None:
        for worker in self.workers:
            self.procs.stop_process(worker)
        self.workers = []

    def wait_path_ready(self) -> None:
        """Gateway /readyz, every worker consuming, then one request through answering 200."""
        assert self.gateway is not None
        everything = [self.gateway, *self.workers]
        for condition, what in (
            (lambda: http_status(self.gateway_url + "/readyz") == 200, "gateway /readyz"),
            (lambda: self._consumers() >= len(self.workers), "workers consuming"),
            (lambda: http_status(self.service_url, PROBE_BODY) == 200, "gateway path"),
        ):
            support.await_ready(condition, everything, what, READY_TIMEOUT)

    def _consumers(self) -> int:
        return rpc_loop.consumer_count(self.args.broker_url, self.queue)

    def start_responder(self) -> None:
        self.responder_queue = f"bench_rpc_{uuid.uuid4().hex[:8]}"
        self.responder = self._serve("rpc-responder", self.responder_queue)

    def start_floor(self) -> None:
        """A no-op worker on its own service: the gateway's ceiling with a free worker."""
        self._serve("no-op-worker", f"{self.floor_service}_requests", "--envelope")

    def _serve(self, name: str, queue: str, *extra: str) -> support.Process:
        """``rpc_loop.py serve`` on ``queue``, once it consumes."""
        command = [sys.executable, "bench/rpc_loop.py", "serve", "--queue", queue, *extra]
        command += ["--broker-url", self.args.broker_url]
        proc = self.procs.run(name, command, **self.env())
        support.await_ready(
            lambda: rpc_loop.consumer_count(self.args.broker_url, queue) > 0,
            [proc],
            name,
            READY_TIMEOUT,
        )
        return proc

    def wait_stub_quiet(self) -> None:
        """Let the previous run's leftovers (requests queued when wrk stopped) finish, so
        they do not slow the next measurement."""
        previous = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            current = stub_stats(self.stub_url)["calls"]
            if current == previous:
                return
            previous = current
            time.sleep(0.2)


# -- measuring -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measured:
    load: LoadResult
    cpu_s: dict[str, float]  # CPU seconds used during the run, per process tree

    def ms_per_request(self, name: str) -> float:
        return 1000 * self.cpu_s[name] / self.load.requests if self.load.requests else float("nan")


def cpu_snapshot(trees: dict[str, list[support.Process]]) -> dict[str, float]:
    return {
        name: sum(resources.tree_cpu_seconds(proc.pid) for proc in group)
        for name, group in trees.items()
    }


def measured(trees: dict[str, list[support.Process]], run: Callable[[], LoadResult]) -> Measured:
    """Run a load and the CPU each process tree spent during it (psutil user+system)."""
    before = cpu_snapshot(trees)
    result = run()
    after = cpu_snapshot(trees)
    return Measured(result, {name: after[name] - before[name] for name in trees})


def wrk(stack: Stack, url: str, concurrency: int, duration: int) -> LoadResult:
    return load.run_wrk(url, concurrency, duration, stack.args.wrk_timeout)


def measure_gateway(stack: Stack, concurrency: int) -> Measured:
    assert stack.gateway is not None
    stack.wait_stub_quiet()
    trees = {"gateway": [stack.gateway], "worker": stack.workers}
    return measured(trees, lambda: wrk(stack, stack.service_url, concurrency, stack.args.duration))


def measure_rpc(stack: Stack, concurrency: int) -> Measured:
    """The RPC loop; its CPU is the client's own (reported) plus the responder's."""
    assert stack.responder is not None
    before = resources.tree_cpu_seconds(stack.responder.pid)
    run = load.run_rpc_client(
        stack.args.broker_url, stack.responder_queue, concurrency, stack.args.duration
    )
    responder_cpu = resources.tree_cpu_seconds(stack.responder.pid) - before
    return Measured(run.result, {"rpc_loop": responder_cpu + run.client_cpu_s})


def measure_floor(stack: Stack, concurrency: int) -> Measured:
    """The gateway answered by a worker that costs nothing (``rpc_loop.py serve --envelope``)."""
    assert stack.gateway is not None
    stack.wait_stub_quiet()  # the gateway path's last requests must not be charged here
    trees = {"gateway": [stack.gateway]}
    return measured(trees, lambda: wrk(stack, stack.floor_url, concurrency, stack.args.duration))


def warm_up(stack: Stack, concurrency: int) -> None:
    """First requests pay for lazy set-up (connections, imports, caches); not measured."""
    if stack.args.warmup <= 0:
        return
    wrk(stack, stack.stub_url + "/echo", concurrency, stack.args.warmup)
    load.run_rpc_client(
        stack.args.broker_url, stack.responder_queue, concurrency, stack.args.warmup
    )
    wrk(stack, stack.service_url, concurrency, stack.args.warmup)
    wrk(stack, stack.floor_url, concurrency, stack.args.warmup)


def median_round(rounds: list[dict], key: Callable[[dict], float]) -> dict:
    """The round whose ``key`` is the median (the lower of the middle two for an even
    count), with every round's value beside it: one whole round, so the numbers in a row
    were measured together."""
    ordered = sorted(rounds, key=key)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds"] = [key(r) for r in rounds]
    return chosen


def gateway_ratio(run: dict) -> float:
    return run["ratios"]["gateway_rps_over_rpc_rps"] or 0.0


def one_concurrency(stack: Stack, concurrency: int) -> dict:
    """The four targets back to back at one concurrency, so their ratios share conditions."""
    duration = stack.args.duration
    direct = wrk(stack, stack.stub_url + "/echo", concurrency, duration)
    rpc = measure_rpc(stack, concurrency)
    gateway = measure_gateway(stack, concurrency)
    floor = measure_floor(stack, concurrency)

    def over_rpc(result: LoadResult) -> float | None:
        return result.rps / rpc.load.rps if rpc.load.rps else None

    return {
        "direct": direct.as_dict(),
        "rpc": rpc.load.as_dict(),
        "gateway": gateway.load.as_dict(),
        "floor": floor.load.as_dict(),
        "ratios": {
            "gateway_rps_over_rpc_rps": over_rpc(gateway.load),
            "gateway_p50_overhead_ms": gateway.load.p50_ms - (rpc.load.p50_ms + direct.p50_ms),
            "floor_rps_over_rpc_rps": over_rpc(floor.load),
            "floor_p50_overhead_ms": floor.load.p50_ms - rpc.load.p50_ms,
        },
        "cpu_ms_per_request": {
            "gateway": gateway.ms_per_request("gateway"),
            "worker": gateway.ms_per_request("worker"),
            "rpc_loop": rpc.ms_per_request("rpc_loop"),
            "gateway_floor": floor.ms_per_request("gateway"),
        },
    }


def rss_mb(group: list[support.Process]) -> float:
    return sum(resources.tree_rss_bytes(proc.pid) for proc in group) / 2**20


def run_standard(stack: Stack) -> dict:
    args = stack.args
    batch = args.mode == "batch"
    stack.start_stub(cost_model=batch)
    worker_env = ({"PROXYMQ_BATCH_URL": "{stub}/batch"} if batch else {}) | dict(args.worker_env)
    stack.start_gateway()
    stack.start_workers(worker_env)
    stack.start_responder()
    stack.start_floor()
    stack.wait_path_ready()
    assert stack.gateway is not None
    rss_before = {"gateway": rss_mb([stack.gateway]), "worker": rss_mb(stack.workers)}
    warm_up(stack, max(args.concurrency))
    runs = {}
    for c in args.concurrency:
        rounds = [one_concurrency(stack, c) for _ in range(args.rounds)]
        runs[str(c)] = median_round(rounds, gateway_ratio)
    rss_after = {"gateway": rss_mb([stack.gateway]), "worker": rss_mb(stack.workers)}
    return {
        "runs": runs,
        "rss": {
            name: {"before_mb": rss_before[name], "after_mb": rss_after[name]}
            for name in rss_before
        },
        "worker_env": worker_env,
    }


def run_compare_batch(stack: Stack) -> dict:
    """Single then batch worker, same stub, same gateway, same run."""
    args = stack.args
    stack.start_stub(cost_model=True)
    stack.start_gateway()
    user_env = dict(args.worker_env)
    modes = {
        "single": {k: v for k, v in user_env.items() if k != "PROXYMQ_BATCH_URL"},
        "batch": BATCH_ENV | user_env,
    }
    rounds = []
    for _ in range(args.rounds):
        one: dict = {"worker_env": modes}
        for mode, env in modes.items():
            stack.start_workers(env)
            stack.wait_path_ready()
            if args.warmup > 0:
                wrk(stack, stack.service_url, max(COMPARE_CONCURRENCY), args.warmup)
            one[mode] = {str(c): compare_one(stack, c) for c in COMPARE_CONCURRENCY}
            stack.stop_workers()
        rounds.append(one | compare_summary(one, args))
    return median_round(rounds, lambda r: r["batch_over_single_rps_64"] or 0.0)


def compare_one(stack: Stack, concurrency: int) -> dict:
    stack.wait_stub_quiet()
    before = stub_stats(stack.stub_url)
    run = measure_gateway(stack, concurrency)
    after = stub_stats(stack.stub_url)
    return {
        "load": run.load.as_dict(),
        "stub": {key: after[key] - before[key] for key in after},
        "cpu_ms_per_request": {
            "gateway": run.ms_per_request("gateway"),
            "worker": run.ms_per_request("worker"),
        },
    }


def compare_summary(results: dict, args: argparse.Namespace) -> dict:
    single, batch = results["single"], results["batch"]
    size = int(results["worker_env"]["batch"].get("PROXYMQ_BATCH_SIZE", "10"))
    single_cap = 1000 / (args.cost_ms + args.cost_per_item_ms)
    batch_cap = 1000 * size / (args.cost_ms + args.cost_per_item_ms * size)
    rps_single = single["64"]["load"]["rps"]
    return {
        "batch_over_single_rps_64": batch["64"]["load"]["rps"] / rps_single if rps_single else None,
        "batch_minus_single_p50_ms_1": batch["1"]["load"]["p50_ms"] - single["1"]["load"]["p50_ms"],
        "stub_capacity": f"{single_cap:,.0f} req/s single, {batch_cap:,.0f} req/s at batch {size}",
    }


# -- main ----------------------------------------------------------------------------------


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT unwind like Ctrl-C, so the ``finally`` that stops the stack
    always runs (SIGINT too: a shell starts background jobs with SIGINT ignored)."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def log_problems(log_dir: Path) -> list[str]:
    """Error lines in the gateway's and workers' logs: a benchmark that hides them lies."""
    problems = []
    for path in sorted(log_dir.glob("*.log")):
        if not path.name.startswith(("gateway", "worker")):
            continue
        lines = path.read_text(errors="replace").splitlines()
        bad = [line for line in lines if "Traceback" in line or "ERROR" in line]
        if bad:
            problems.append(f"{path.name}: {len(bad)} error lines, first: {bad[0].strip()}")
    return problems


def header(args: argparse.Namespace) -> str:
    mode = "compare-batch" if args.compare_batch else args.mode
    load1, load5, _ = os.getloadavg()
    return (
        f"## ProxyMQ benchmark ({mode}): duration {args.duration}s, "
        f"gateway procs {args.gateway_procs}, workers {args.workers}, "
        f"{os.cpu_count()} CPUs, load average {load1:.2f}/{load5:.2f} at start"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="proxymq-bench-"))
    stack = Stack(args, support.Stack(log_dir))
    print(header(args), flush=True)
    print(f"logs: {log_dir}", flush=True)
    try:
        with signals_interrupt():
            results = run_compare_batch(stack) if args.compare_batch else run_standard(stack)
    except KeyboardInterrupt:
        print("interrupted; stopping the stack", file=sys.stderr)
        return 130
    except (support.StartError, load.LoadError) as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    finally:
        stack.procs.stop()
    text = (
        report.compare_batch_report(results)
        if args.compare_batch
        else report.standard_report(results)
    )
    problems = log_problems(log_dir)
    print(text)
    print("\nlog problems: " + ("; ".join(problems) if problems else "none"))
    if args.json:
        results["options"] = {k: str(v) for k, v in vars(args).items()}
        results["log_problems"] = problems
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load generators: wrk for HTTP targets, the bare RPC loop's client for the broker.

Both run as separate processes (never in the orchestrating process, whose own CPU use
would otherwise leak into what is measured) and are reduced to the same ``LoadResult``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
POST_LUA = BENCH / "post.lua"
UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


@dataclass(frozen=True, slots=True)
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    error_detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class LoadError(RuntimeError):
    """The load generator failed or printed something we cannot read."""


# -- wrk ----------------------------------------------------------------------------------


def run_wrk(url: str, concurrency: int, duration: float, timeout_s: float = 10) -> LoadResult:
    """One wrk run: one thread (wrk needs -c >= -t), ~100-byte POST bodies."""
    args = [
        "wrk",
        "-t1",
        f"-c{max(1, concurrency)}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout_s:g}s",
        "--latency",
        "-s",
        str(POST_LUA),
        url,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise LoadError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout}")
    return parse_wrk(done.stdout)


def parse_wrk(text: str) -> LoadResult:
    """Read req/s, p50, p99 (from "Latency Distribution") and errors from wrk's report."""
    rps = _search(r"^Requests/sec:\s+([\d.]+)", text, "Requests/sec")
    requests = int(_search(r"^\s*(\d+) requests in", text, "request count"))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text, re.M)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    details = []
    errors = 0
    if non_2xx:
        errors += int(non_2xx.group(1))
        details.append(f"non-2xx/3xx {non_2xx.group(1)}")
    if socket_errors:
        kinds = ("connect", "read", "write", "timeout")
        counts = dict(zip(kinds, map(int, socket_errors.groups()), strict=True))
        errors += sum(counts.values())
        details += [f"{kind} {count}" for kind, count in counts.items() if count]
    return LoadResult(
        rps=float(rps),
        p50_ms=_percentile_ms(text, "50"),
        p99_ms=_percentile_ms(text, "99"),
        requests=requests,
        errors=errors,
        error_detail=", ".join(details),
    )


def _percentile_ms(text: str, percent: str) -> float:
    match = re.search(rf"^\s*{percent}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
    if match is None:
        raise LoadError(f"no {percent}% line in wrk's Latency Distribution:\n{text}")
    return float(match.group(1)) * UNIT_MS[match.group(2)]


def _search(pattern: str, text: str, what: str) -> str:
    match = re.search(pattern, text, re.M)
    if match is None:
        raise LoadError(f"no {what} in wrk's output:\n{text}")
    return match.group(1)


# -- the bare RPC loop ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RpcRun:
    result: LoadResult
    client_cpu_s: float


def run_rpc_client(
    broker_url: str, queue: str, concurrency: int, duration: float, warmup: float = 0.0
) -> RpcRun:
    """One closed-loop run of ``bench/rpc_loop.py client`` against a running responder."""
    args = [
        sys.executable,
        str(BENCH / "rpc_loop.py"),
        "client",
        "--broker-url",
        broker_url,
        "--queue",
        queue,
        "-c",
        str(concurrency),
        "-d",
        str(duration),
        "--warmup",
        str(warmup),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise LoadError(f"rpc_loop client exited {done.returncode}: {done.stderr.strip()}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    result = LoadResult(
        rps=data["rps"],
        p50_ms=data["p50_ms"],
        p99_ms=data["p99_ms"],
        requests=data["requests"],
        errors=data["errors"],
        error_detail=f"lost {data['errors']}" if data["errors"] else "",
    )
    return RpcRun(result, data["cpu_s"])

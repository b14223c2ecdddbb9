"""Markdown tables from the benchmark's results (plain dicts, as also written to JSON)."""

from __future__ import annotations

import math

TARGETS = (
    ("direct", "direct stub"),
    ("rpc", "bare RPC loop"),
    ("gateway", "gateway path"),
    ("floor", "gateway, no-op worker"),
)


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _load_cells(result: dict) -> list[str]:
    errors = str(result["errors"])
    if result.get("error_detail"):
        errors += f" ({result['error_detail']})"
    return [
        _num(result["rps"], 0),
        _num(result["p50_ms"]),
        _num(result["p99_ms"]),
        errors,
    ]


def _rounds(values: list[float]) -> str:
    """Every round's value, so the reader sees the spread behind the median."""
    return " / ".join(_num(v) for v in values) if len(values) > 1 else "-"


def standard_report(results: dict) -> str:
    """Throughput/latency per concurrency, the gateway's ratios, CPU per request, RSS."""
    runs = results["runs"]
    load_rows, ratio_rows, cpu_rows = [], [], []
    for concurrency, run in runs.items():
        for key, label in TARGETS:
            load_rows.append([concurrency, label, *_load_cells(run[key])])
        ratios = run["ratios"]
        ratio_rows.append(
            [
                concurrency,
                _num(ratios["gateway_rps_over_rpc_rps"]),
                _rounds(run.get("rounds", [])),
                _num(ratios["gateway_p50_overhead_ms"]),
                _num(ratios["floor_rps_over_rpc_rps"]),
                _num(ratios["floor_p50_overhead_ms"]),
            ]
        )
        cpu = run["cpu_ms_per_request"]
        cpu_rows.append(
            [
                concurrency,
                _num(cpu["gateway"]),
                _num(cpu["worker"]),
                _num(cpu["gateway"] + cpu["worker"]),
                _num(cpu["rpc_loop"]),
                _num(cpu["gateway_floor"]),
            ]
        )
    rss_rows = [
        [name, _num(value["before_mb"], 1), _num(value["after_mb"], 1)]
        for name, value in results["rss"].items()
    ]
    return "\n\n".join(
        [
            _table(["c", "target", "req/s", "p50 ms", "p99 ms", "errors"], load_rows),
            _table(
                [
                    "c",
                    "gateway ÷ RPC loop (req/s)",
                    "every round",
                    "gateway p50 - (RPC p50 + direct p50) ms",
                    "no-op worker: gateway ÷ RPC loop",
                    "no-op worker: p50 - RPC p50 ms",
                ],
                ratio_rows,
            ),
            _table(
                [
                    "c",
                    "gateway ms CPU/req",
                    "worker ms CPU/req",
                    "gateway+worker",
                    "RPC loop (client+responder)",
                    "gateway ms CPU/req, no-op worker",
                ],
                cpu_rows,
            ),
            _table(["process tree", "RSS before MB", "RSS after MB"], rss_rows),
        ]
    )


def compare_batch_report(results: dict) -> str:
    """Single vs batch worker against the cost-model stub, with what the stub saw."""
    rows = []
    for mode in ("single", "batch"):
        for concurrency, run in results[mode].items():
            stub = run["stub"]
            items_per_call = stub["items"] / stub["calls"] if stub["calls"] else None
            rows.append(
                [
                    mode,
                    concurrency,
                    *_load_cells(run["load"]),
                    str(stub["calls"]),
                    str(stub["batch_calls"]),
                    _num(items_per_call),
                    _num(run["cpu_ms_per_request"]["worker"]),
                ]
            )
    header = [
        "worker",
        "c",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "stub calls",
        "/batch calls",
        "items/call",
        "worker ms CPU/req",
    ]
    summary = _table(
        [
            "batch ÷ single req/s at c=64",
            "every round",
            "batch p50 - single p50 at c=1 (ms)",
            "stub capacity",
        ],
        [
            [
                _num(results["batch_over_single_rps_64"]),
                _rounds(results.get("rounds", [])),
                _num(results["batch_minus_single_p50_ms_1"]),
                results["stub_capacity"],
            ]
        ],
    )
    text = _table(header, rows) + "\n\n" + summary
    if not any(run["stub"]["batch_calls"] for run in results["batch"].values()):
        text += (
            "\n\nNote: the stub received no /batch call in batch mode: the worker did not"
            " batch (batch mode missing, or PROXYMQ_BATCH_URL ignored)."
        )
    return text

"""The flow control's Prometheus metrics (SPEC.md's names), on the worker's endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from proxymq.metrics import LATENCY_BUCKETS

concurrency_limit = Gauge(
    "proxymq_worker_concurrency_limit",
    "Downstream calls the service may have in flight, all workers together (the limit now)",
    ["service"],
)
paused_seconds_total = Counter(
    "proxymq_worker_paused_seconds_total",
    "Seconds of service-wide pause this worker started on a downstream's Retry-After",
    ["service"],
)
flow_wait = Histogram(
    "proxymq_worker_flow_wait_seconds",
    "Time a request waited for a concurrency slot, a rate token or a pause's end",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
flow_degraded = Gauge(
    "proxymq_worker_flow_degraded",
    "1 while Redis cannot be reached and the limits fall back to this worker's share",
    ["service"],
)
breaker_open = Gauge(
    "proxymq_worker_breaker_open",
    "1 while the service's breaker is open (or waiting for its probe's answer)",
    ["service"],
)
retries_total = Counter(
    "proxymq_worker_retries_total",
    "Extra attempts of failed calls of safe requests, by why the call failed",
    ["service", "reason"],
)

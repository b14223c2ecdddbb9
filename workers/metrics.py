"""The worker's Prometheus metrics, served on ``PROXYMQ_WORKER_METRICS_PORT``."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from proxymq.metrics import LATENCY_BUCKETS

downstream_requests_total = Counter(
    "proxymq_worker_downstream_requests_total",
    "Downstream calls answered, by service and status (502 when none came)",
    ["service", "status"],
)
downstream_duration = Histogram(
    "proxymq_worker_downstream_duration_seconds",
    "Time of one downstream call (a whole batch call in batch mode)",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
queue_wait = Histogram(
    "proxymq_worker_queue_wait_seconds",
    "Time from the gateway's publish to the worker taking the request",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
batch_size = Histogram(
    "proxymq_worker_batch_size",
    "Requests per batch call",
    ["service"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
batch_wait = Histogram(
    "proxymq_worker_batch_wait_seconds",
    "Time the first request of a batch waited for the batch to close",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
expired_total = Counter(
    "proxymq_worker_expired_total",
    "Requests dropped unseen because their deadline passed",
    ["service"],
)
dead_lettered_total = Counter(
    "proxymq_worker_dead_lettered_total",
    "Requests moved to <service>_requests.dead (too many deliveries, or undecodable)",
    ["service"],
)
jobs_total = Counter(
    "proxymq_worker_jobs_total",
    "Asynchronous jobs by outcome (completed, failed, skipped after a cancel)",
    ["service", "outcome"],
)
streams_total = Counter(
    "proxymq_worker_streams_total",
    "Streamed answers relayed, by how they ended (end, abort, cancelled)",
    ["service", "outcome"],
)

"""The worker's Prometheus metrics, served on ``PROXYMQ_WORKER_METRICS_PORT``.

Observers (``workers.observers``): the code counts through ``count`` and ``measure``
inside ``observe``, after the step they count, so a metric that fails loses a sample,
never an answer or an ack.
"""

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
replayed_total = Counter(
    "proxymq_worker_replayed_total",
    "Dead letters an operator replayed, counted as a worker takes each (first delivery)",
    ["service"],
)
dead_letters_purged_total = Counter(
    "proxymq_worker_dead_letters_purged_total",
    "Dead letters an operator purged, counted by the one worker the purge command told",
    ["service"],
)
jobs_total = Counter(
    "proxymq_worker_jobs_total",
    "Asynchronous jobs by outcome (completed, failed, skipped after a cancel)",
    ["service", "outcome"],
)
callbacks_total = Counter(
    "proxymq_worker_callbacks_total",
    "Job callback attempts by outcome (delivered, retrying, failed for good), and callbacks"
    " deferred to the broker because this worker held enough for their host",
    ["service", "outcome"],
)
streams_total = Counter(
    "proxymq_worker_streams_total",
    "Streamed answers relayed, by how they ended (end, abort, cancelled)",
    ["service", "outcome"],
)


def count(counter: Counter, *labels: str) -> None:
    counter.labels(*labels).inc()


def measure(histogram: Histogram, label: str, value: float) -> None:
    histogram.labels(label).observe(value)

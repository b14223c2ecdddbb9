"""The gateway's Prometheus metrics, summed over every gunicorn worker process.

prometheus_client's multiprocess mode: each process writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (``gunicorn.conf.py`` sets it up in the master), and
``/metrics`` reads them all, whichever process answers the scrape.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from gateway import errors
from proxymq.config import GatewayConfig
from proxymq.metrics import LATENCY_BUCKETS
from proxymq.parsers import queue_name

# A name nobody asked for must not become a label value: unknown services share one.
UNKNOWN_SERVICE = "_unknown"


requests_total = Counter(
    "proxymq_gateway_requests_total",
    "Requests answered, by service and status",
    ["service", "status"],
)
request_duration = Histogram(
    "proxymq_gateway_request_duration_seconds",
    "Time from request to answer",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
inflight = Gauge(
    "proxymq_gateway_inflight",
    "Requests waiting for a reply",
    ["service"],
    multiprocess_mode="livesum",
)
timeouts_total = Counter(
    "proxymq_gateway_timeouts_total", "Requests answered 504 timeout", ["service"]
)
shed_total = Counter(
    "proxymq_gateway_shed_total",
    "Requests refused without reaching a worker, by reason (queue-full, broker-unavailable, "
    "service-unavailable, deadline-unreachable)",
    ["service", "reason"],
)
# The gateway's refusals counted as shed load (proxymq_gateway_shed_total's reasons).
SHED_CODES = frozenset(
    entry.code
    for entry in (
        errors.QUEUE_FULL,
        errors.BROKER_UNAVAILABLE,
        errors.SERVICE_UNAVAILABLE,
        errors.DEADLINE_UNREACHABLE,
    )
)


streams_inflight = Gauge(
    "proxymq_gateway_streams_inflight",
    "Streamed answers being relayed to clients",
    multiprocess_mode="livesum",
)
streamed_bytes_total = Counter(
    "proxymq_gateway_streamed_bytes_total", "Body bytes of streamed answers sent to clients"
)
stream_first_byte = Histogram(
    "proxymq_gateway_stream_first_byte_seconds",
    "Time from request to a streamed answer's status and headers",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
streams_cancelled_total = Counter(
    "proxymq_gateway_streams_cancelled_total",
    "Streams cut off before their end, by why (aborted, idle, client-gone, overflow, "
    "out-of-order, worker-gone, other)",
    ["reason"],
)
jobs_total = Counter(
    "proxymq_gateway_jobs_total",
    "Asynchronous jobs by what happened at the gateway (submitted, cancelled, forgotten)",
    ["service", "event"],
)

idempotent_replays_total = Counter(
    "proxymq_gateway_idempotent_replays_total",
    "Repeats of an Idempotency-Key answered with the first request's answer",
    ["service"],
)
idempotent_waits_total = Counter(
    "proxymq_gateway_idempotent_waits_total",
    "Repeats of an Idempotency-Key that waited for the first request, still running",
    ["service"],
)
async_fallbacks_total = Counter(
    "proxymq_gateway_async_fallbacks_total",
    "Prefer: respond-async, wait=<s> requests not done within the wait (answered 202)",
    ["service"],
)
requests_by_priority_total = Counter(
    "proxymq_gateway_requests_by_priority_total",
    "Requests sent with X-ProxyMQ-Priority, by priority",
    ["service", "priority"],
)


def label(service: str, config: GatewayConfig, known_queues: set[str]) -> str:
    """The service as a metric label, only once it is known to be real: allowed by
    ``PROXYMQ_SERVICES``, or its queue confirmed a publish. A name any client can
    invent must not become a label value (every value is a new time series)."""
    if config.services is not None and service in config.services:
        return service
    if queue_name(service) in known_queues:
        return service
    return UNKNOWN_SERVICE


def count(service: str, status: int, code: str | None, started: float) -> None:
    """Count one answered request under an already checked label; ``code`` is the
    gateway's error code, if it answered one (never read back from the answer's headers,
    which a downstream could have set)."""
    if code == errors.TIMEOUT.code:
        timeouts_total.labels(service).inc()
    elif code in SHED_CODES:
        shed_total.labels(service, code).inc()
    requests_total.labels(service, str(status)).inc()
    request_duration.labels(service).observe(time.perf_counter() - started)


def exposition() -> tuple[bytes, str]:
    """The metrics text of all gateway processes (or of this one outside gunicorn)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST

"""Other exporters' metric names the dashboard and alerts may use, and a small PromQL
name extractor.

ProxyMQ's own names (``proxymq_*``) are not listed here: tests/integration/
test_exported_metrics.py scrapes the running gateway and worker and holds every dashboard
and alert expression to what they export. RabbitMQ's plugin and celery-exporter do not run
in the tests, so their names are written down from their documentation.
"""

from __future__ import annotations

import re


def _histogram(name: str) -> set[str]:
    return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}


# rabbitmq_prometheus plugin (per-object metrics on, so they carry a `queue` label).
RABBITMQ_METRICS = {
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_consumers",
}

# danihodovic/celery-exporter (PyPI prometheus-exporter-celery).
CELERY_EXPORTER_METRICS = {
    "celery_queue_length",
    "celery_active_consumer_count",
    "celery_active_worker_count",
    "celery_active_process_count",
    "celery_worker_up",
    "celery_worker_tasks_active",
    *(
        f"celery_task_{state}_total"
        for state in (
            "sent",
            "received",
            "started",
            "succeeded",
            "failed",
            "rejected",
            "revoked",
            "retried",
        )
    ),
    *_histogram("celery_task_runtime"),
}

OTHER_EXPORTERS = RABBITMQ_METRICS | CELERY_EXPORTER_METRICS | {"up"}


def unknown_metrics(expr: str) -> set[str]:
    """Names in ``expr`` that are neither ProxyMQ's (checked against the processes by the
    integration test) nor another exporter's."""
    return {n for n in metric_names(expr) if not n.startswith("proxymq_")} - OTHER_EXPORTERS


_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:]|\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions, labels, keywords removed)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}


GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "${__rate_interval}": "5m",
    "$__interval": "1m",
    "${__interval}": "1m",
    "$__range": "1h",
    "${__range}": "1h",
    "${service:regex}": "url_fetcher",
    "${service}": "url_fetcher",
    "$service": "url_fetcher",
}


def substitute_grafana_variables(expr: str) -> str:
    for var in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_VARIABLES[var])
    return expr

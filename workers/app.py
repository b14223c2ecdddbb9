"""The workers' Celery app: settings, service queues, and start-up validation.

Defaults an I/O proxy needs, unlike Celery's: a thread pool of 64 (Celery's default is a
prefork pool of one process per core, i.e. 2 calls at once here). Threads need no
monkey-patching, so the plain ``celery -A workers worker`` runs calls concurrently;
``-c`` still sets the limit and ``-P gevent`` still works. Acks are late and a lost
worker's messages go back to the queue, so a killed worker loses nothing.
"""

from __future__ import annotations

import os
import sys

import prometheus_client
from celery import Celery, signals
from kombu import Queue

from proxymq.config import ConfigError, ServiceConfig, WorkerConfig, broker_url
from workers import batching, runtime

DEFAULT_CONCURRENCY = 64


def _stop(error: ConfigError) -> None:
    """Print one line and exit; ``os._exit`` because Celery would report a SystemExit
    raised from a signal handler with a traceback."""
    sys.stderr.write(f"Error: {error}\n")
    sys.stderr.flush()
    os._exit(1)


def service_queue(service: ServiceConfig) -> Queue:
    """The service's durable queue, declared by the workers (never by the gateway)."""
    arguments: dict = {}
    if service.queue_type == "quorum":
        # Quorum queues count deliveries natively; the workers dead-letter (with a poison
        # reply) one delivery before this backstop would drop the message.
        arguments["x-queue-type"] = "quorum"
        arguments["x-delivery-limit"] = service.max_deliveries + 1
    if service.queue_max_length is not None:
        arguments["x-max-length"] = service.queue_max_length
        arguments["x-overflow"] = "reject-publish"
    # The gateway publishes to the default exchange, which routes by queue name; the
    # binding Celery adds to its own exchange is unused but harmless.
    return Queue(service.queue, routing_key=service.queue, durable=True, queue_arguments=arguments)


def _broker_url() -> str:
    try:
        return broker_url(os.environ)
    except ConfigError as error:
        _stop(error)
        raise


app = Celery("workers", broker=_broker_url())
app.conf.update(
    task_serializer="msgpack",
    accept_content=["msgpack", "json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    worker_pool="threads",
    worker_concurrency=DEFAULT_CONCURRENCY,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    # The thread pool cannot cancel a running call; Celery would fail trying and its
    # consumer restart with it. The call finishes; its message was requeued anyway.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # After a reconnect with calls still running, Celery lowers the prefetch and raises it
    # again as acks come in; seen here to stall consumption until a call from before the
    # outage finished. Our prefetch is the thread count, so there is nothing to protect.
    worker_enable_prefetch_count_reduction=False,
    broker_connection_retry_on_startup=True,
    task_create_missing_queues=False,
    worker_consumer="workers.consumer:Consumer",
)


@signals.celeryd_init.connect
def _configure(sender=None, instance=None, conf=None, options=None, **_) -> None:
    """Read the configuration once the served queues (``-Q``) are known."""
    options = options or {}
    queues = options.get("queues")
    if isinstance(queues, str):
        queues = [q for q in queues.split(",") if q]
    try:
        config = WorkerConfig.from_env(os.environ, queues or None)
    except ConfigError as error:
        _stop(error)
    conf.task_queues = [service_queue(service) for service in config.services.values()]
    # Flower and celery-exporter need task events; PROXYMQ_TASK_EVENTS=false saves three
    # event messages per request. Set here: the worker reads it after this signal.
    conf.worker_send_task_events = config.task_events
    concurrency = options.get("concurrency") or conf.worker_concurrency
    runtime.start(config, concurrency)
    try:
        prometheus_client.start_http_server(config.metrics_port)
    except OSError as exc:
        _stop(
            ConfigError(
                "PROXYMQ_WORKER_METRICS_PORT",
                f"cannot listen on {config.metrics_port}: {exc.strerror}",
            )
        )


@signals.worker_ready.connect
def _open_health_gate(sender=None, **_) -> None:
    runtime.current().health.start(app, sender.hostname)


@signals.worker_shutting_down.connect
def _close_health_gate(**_) -> None:
    runtime.current().health.stop()


# Services with a batch_url are consumed by this bootstep, not by the task consumer.
app.steps["consumer"].add(batching.BatchStep)

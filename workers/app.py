"""The workers' Celery app: settings, service queues, and start-up validation.

Defaults an I/O proxy needs, unlike Celery's: 64 downstream calls at once (Celery's
default is a prefork pool of one process per core, i.e. 2 calls at once here), in
threads, which need no monkey-patching, so the plain ``celery -A workers worker`` runs
calls concurrently; ``-c`` sets how many. The pool must be threads: the consumer thread
owns the broker connection and the call threads hand their outcomes back to it
(``workers.pipeline``) through Celery's event loop, which the gevent, eventlet and solo
pools run without, and prefork would fork processes that nothing uses.
"""

from __future__ import annotations

import os
import socket
import sys

import prometheus_client
from celery import Celery, signals
from celery.concurrency import get_implementation
from kombu import Queue

from proxymq import tracing
from proxymq.broker_tls import check_broker_certificate
from proxymq.config import BrokerLink, ServiceConfig, WorkerConfig
from proxymq.parsers import ConfigError
from workers.consumer import ForwardStep
from workers.failover import AMQP
from workers.runtime import Runtime

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
    if service.max_priority is not None:
        arguments["x-max-priority"] = service.max_priority
    if service.queue_max_length is not None:
        arguments["x-max-length"] = service.queue_max_length
        arguments["x-overflow"] = "reject-publish"
    # The gateway publishes to the default exchange, which routes by queue name; the
    # binding Celery adds to its own exchange is unused but harmless.
    return Queue(service.queue, routing_key=service.queue, durable=True, queue_arguments=arguments)


def node_name(services: list[str], given: str, argv: list[str]) -> str:
    """The worker's node name: ``-n`` when given, else one unique to this process.

    Celery's default, ``celery@<host>``, is the same for every worker on a host, and
    Kombu 5.7's pidbox queues are exclusive: a second worker started without ``-n``
    would die at start. So the default is ``<services>.<pid>@<host>``.
    """
    named = any(a in ("-n", "--hostname") or a.startswith(("--hostname=", "-n")) for a in argv)
    if named or given != f"celery@{socket.gethostname()}":
        return given
    return f"{'-'.join(services)[:60]}.{os.getpid()}@{socket.gethostname()}"


def _broker() -> BrokerLink:
    """The broker's part of the settings, read at import: Flower (``celery -A workers
    flower``) and the other celery commands use this app's settings without a worker's
    start-up signals, and they too must check the broker's certificate and host name.
    A worker hands it on to ``WorkerConfig.from_env`` (``_configure``), which does not
    read it again."""
    try:
        return BrokerLink.from_env(os.environ)
    except ConfigError as error:
        _stop(error)
        raise


def _broker_use_ssl(broker: BrokerLink) -> dict | bool:
    """Celery's ``broker_use_ssl``: the options name the list's first node;
    ``workers.failover`` renames the host for each node a connection fails over to."""
    return broker.tls.ssl_options(broker.tls.nodes[0].host) if broker.tls else False


_BROKER = _broker()
app = Celery("workers", broker=_BROKER.url, amqp=AMQP)
app.conf.update(
    broker_use_ssl=_broker_use_ssl(_BROKER),
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
    # Kombu 5.7 declares remote-control (pidbox) queues exclusive. On a cluster, a worker
    # that reconnects to another node while the broker still holds its old connection's
    # queue got 405 RESOURCE_LOCKED and died (seen in the rolling-restart test). Node names
    # are unique per process (``node_name``), so what exclusivity guards against (two
    # workers of one name) cannot happen; the queue still goes with its consumer
    # (auto-delete, Celery's 10 s expiry).
    control_queue_exclusive=False,
    # The channel errors of a node going away are retried like a lost connection, not
    # fatal (``workers.consumer.TRANSIENT_CHANNEL_ERRORS``).
    broker_channel_error_retry=True,
)
app.steps["consumer"].add(ForwardStep)


@signals.celeryd_init.connect
def _configure(sender=None, instance=None, conf=None, options=None, **_) -> None:
    """Read the configuration once the served queues (``-Q``) are known."""
    options = options or {}
    queues = options.get("queues")
    if isinstance(queues, str):
        queues = [q for q in queues.split(",") if q]
    try:
        config = WorkerConfig.from_env(os.environ, queues or None, broker=_BROKER)
        tracing.check(os.environ)
        _check_pool(options.get("pool") or conf.worker_pool)
        if config.broker_tls is not None:
            check_broker_certificate(config.broker_tls)
    except ConfigError as error:
        _stop(error)
    conf.task_queues = [service_queue(service) for service in config.services.values()]
    # Flower and celery-exporter need task events; PROXYMQ_TASK_EVENTS=false saves three
    # event messages per request. Set here: the worker reads it after this signal.
    conf.worker_send_task_events = config.task_events
    instance.hostname = node_name(list(config.services), instance.hostname, sys.argv)
    concurrency = options.get("concurrency") or conf.worker_concurrency
    instance.proxymq = Runtime.build(config, concurrency)
    # The threads pool forks nothing: the span processor's thread starts here, for good.
    tracing.setup(tracing.WORKER)
    try:
        prometheus_client.start_http_server(config.metrics_port)
    except OSError as exc:
        _stop(
            ConfigError(
                "PROXYMQ_WORKER_METRICS_PORT",
                f"cannot listen on {config.metrics_port}: {exc.strerror}",
            )
        )


def _check_pool(pool) -> None:
    threads = get_implementation("threads")
    chosen = get_implementation(pool) if isinstance(pool, str) else pool
    if chosen is not threads:
        name = getattr(chosen, "__module__", str(chosen)).rsplit(".", 1)[-1]
        raise ConfigError("-P", f"ProxyMQ workers run on the threads pool, not {name!r}")


@signals.worker_shutdown.connect
def _flush_spans(**_) -> None:
    tracing.shutdown()


@signals.worker_ready.connect
def _open_health_gate(sender=None, **_) -> None:
    sender.controller.proxymq.health.start(app, sender.hostname)

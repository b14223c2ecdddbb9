"""gunicorn settings for ``gunicorn gateway:app`` and ``gunicorn fetcher:app``.

gunicorn reads this file in the master, before it forks. Configuration is validated
here on purpose: gunicorn respawns a worker that dies at import forever, so a bad
setting must stop the master with one line instead. Nothing here imports the apps
(importing them in the master would create their state before the fork).
"""

import os
import sys
import tempfile


def _serving(module: str) -> bool:
    return any(arg.split(":")[0] == module for arg in sys.argv[1:] if ":" in arg)


def _stop(error: Exception) -> None:
    sys.stderr.write(f"Error: {error}\n")
    sys.exit(1)


worker_class = "gevent"


def _gateway_worker():
    """gunicorn's gevent worker, answering its own header-limit refusals as the gateway
    answers every error of its own: 431 with ``X-ProxyMQ-Error: headers-too-large`` and
    the JSON body. Defined here, not in ``gateway/``: importing that package builds the
    app, which must not happen in the master."""
    import contextlib
    import json

    from gunicorn.http.errors import LimitRequestHeaders
    from gunicorn.workers.ggevent import GeventWorker

    class GatewayWorker(GeventWorker):
        def handle_error(self, req, client, addr, exc):
            if not isinstance(exc, LimitRequestHeaders):
                return super().handle_error(req, client, addr, exc)
            self.log.warning("request headers over the limit from %s: %s", addr[0], exc)
            body = json.dumps(
                {
                    "error": "headers-too-large",
                    "message": "request headers over the limit",
                    "correlation_id": None,
                }
            ).encode()
            head = (
                "HTTP/1.1 431 Request Header Fields Too Large\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                "X-ProxyMQ-Error: headers-too-large\r\n"
                "Connection: close\r\n\r\n"
            )
            with contextlib.suppress(OSError):  # a client that has gone is told nothing
                client.sendall(head.encode() + body)

    return GatewayWorker

worker_connections = 2000
# Idle keep-alive connections hold a graceful shutdown until they time out, so short.
keepalive = 5
# Several gunicorns (gateway, fetcher) run side by side; the shared control socket
# path would make them fight over it, and nothing here uses it.
control_socket_disable = True

if _serving("fetcher"):
    from fetcher.config import ConfigError, FetcherConfig

    try:
        _config = FetcherConfig.from_env(os.environ)
    except ConfigError as error:
        _stop(error)
    bind = [_config.bind]
else:
    from proxymq.config import ConfigError, GatewayConfig, check_broker_certificate

    try:
        _config = GatewayConfig.from_env(os.environ)
        # A broker certificate that does not verify would fail every worker's every
        # reconnect; one line from the master instead (a broker that is down is no error).
        if _config.broker_tls is not None:
            check_broker_certificate(_config.broker_tls)
    except ConfigError as error:
        _stop(error)
    bind = [_config.bind]
    # gunicorn's parser rescans its whole buffer on every read: the cost of a header block
    # grows with the square of its size, and while one flood is parsed every other
    # connection of the process waits. Its own limits bound the block it will scan to
    # fields x field size (here at most 100 x 8 KiB); the gateway's total limit,
    # PROXYMQ_MAX_HEADER_BYTES (431 with its JSON error), applies within that.
    limit_request_field_size = min(_config.max_header_bytes, 8190)
    limit_request_fields = 100
    worker_class = _gateway_worker()
    # A SIGTERMed worker answers the requests it holds before it exits.
    graceful_timeout = int(_config.reply_timeout) + 5
    # Metrics of all worker processes meet in one directory (prometheus_client's
    # multiprocess mode); it must exist, empty, before any worker imports the client.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="proxymq-metrics-")


def child_exit(server, worker) -> None:
    """Forget a dead worker's live gauges (its counters stay in the totals)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker) -> None:
    """Connect this worker process to the broker (its own reply queue) before serving."""
    extensions = getattr(worker.wsgi, "extensions", {})
    link = extensions.get("proxymq.link")
    if link is not None:
        link.start()
        link.wait_ready(5)

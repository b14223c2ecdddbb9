"""gunicorn settings for ``gunicorn gateway:app``, ``gunicorn fetcher:app`` and the
example ``gunicorn examples.words:app``.

gunicorn reads this file in the master, before it forks. What each app needs of its
own (its bind address, its worker class) is set from the app gunicorn was asked to
serve, as gunicorn's configuration has it (``_serve``), by the app's own code: the
gateway's in ``gateway.server``. Its settings are checked there on purpose: gunicorn respawns a
worker that dies at import forever, so a bad setting must stop the master with one
line instead. Nothing here imports the apps (importing them in the master would create
their state before the fork).
"""

import os
import sys

from gateway.server import SafeLogger  # the gateway's package: importing it builds nothing
from proxymq import tracing  # imports no OpenTelemetry until set up

worker_class = "gevent"
worker_connections = 2000
# Idle keep-alive connections hold a graceful shutdown until they time out, so short.
keepalive = 5
# Several gunicorns (gateway, fetcher) run side by side; the shared control socket
# path would make them fight over it, and nothing here uses it.
control_socket_disable = True

_service_name = None  # the tracing service name of the app served, set on starting


def _gateway(cfg) -> tuple[str, str | None]:
    from gateway import server

    server.configure(cfg)
    return server.settings().bind, tracing.GATEWAY


def _fetcher(cfg) -> tuple[str, str | None]:
    from fetcher.config import ConfigError, FetcherConfig

    try:
        config = FetcherConfig.from_env(os.environ)
        tracing.check(os.environ)
    except ConfigError as error:
        sys.stderr.write(f"Error: {error}\n")
        sys.exit(1)
    return config.bind, tracing.FETCHER


def _words(cfg) -> tuple[str, str | None]:
    # The streaming example: gevent workers (a sleeping stream yields), nothing else of
    # the gateway's (no tracing either); bind with -b, else WORDS_BIND.
    return os.environ.get("WORDS_BIND", "0.0.0.0:8090"), None


_APPS = {"gateway": _gateway, "fetcher": _fetcher, "examples.words": _words}


def _serve(cfg) -> None:
    """The served app's own settings, from gunicorn's final configuration (the app it
    was given: ``gateway:app`` is ``default_proc_name``, or the ``wsgi_app`` setting)."""
    global _service_name
    module = (cfg.wsgi_app or cfg.default_proc_name or "").partition(":")[0]
    # The package's own settings (gateway.factory:create_app() is the gateway's); any
    # other app is taken for the gateway, as it always was.
    own = next((f for name, f in _APPS.items() if f"{module}.".startswith(f"{name}.")), _gateway)
    bind, _service_name = own(cfg)
    if cfg.bind == cfg.settings["bind"].default:  # not given on the command line
        cfg.set("bind", [bind])


class _Logger(SafeLogger):
    """gunicorn has no hook between reading its configuration and its first log line
    ("Starting gunicorn"), and a bad setting must be one line: the master's logger is
    the one thing gunicorn builds from the final configuration before it, and again on
    a reload, before it picks the worker class and the address. Its setup applies the
    served app's own settings first."""

    def setup(self, cfg) -> None:
        _serve(cfg)
        super().setup(cfg)


logger_class = _Logger


def child_exit(server, worker) -> None:
    """Forget a dead worker's live gauges (its counters stay in the totals)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker) -> None:
    """Start exporting spans when tracing is on (here: after the fork and gevent's
    patching, so the span processor's thread is a greenlet of this process), and
    connect this worker process to the broker (its own reply queue) before serving."""
    if _service_name is not None:
        tracing.setup(_service_name)
    extensions = getattr(worker.wsgi, "extensions", {})
    link = extensions.get("proxymq.link")
    if link is not None:
        link.start()
        link.wait_ready(5)


def worker_exit(server, worker) -> None:
    """Export the spans still buffered before the worker process goes."""
    tracing.shutdown()

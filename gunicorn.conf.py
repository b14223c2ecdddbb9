"""gunicorn settings for ``gunicorn gateway:app``, ``gunicorn fetcher:app`` and the
example ``gunicorn examples.words:app``.

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


def _safe_logger():
    """gunicorn's logger, with every access-log field made safe to write.

    Request lines, paths and headers are the client's: ``%(U)s`` is the *decoded* path,
    so ``%0d%0a`` in it would start a forged log line, and a terminal escape in a
    User-Agent would reach whoever reads the log. Control characters and backslashes are
    escaped (quotes gunicorn escapes itself), and job ids in ``/jobs/<id>`` paths are replaced
    by ``…``: a job id is a secret, held by its client alone.
    """
    import re

    from gunicorn.glogging import Logger

    job_path = re.compile(r"(^|\s)(/jobs/)[^/?\s]+")  # the gateway's /jobs/, not a service's

    def escape_char(char):
        if char == "\\":
            return "\\\\"
        return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")

    def escape(value):
        if not isinstance(value, str) or (
            value.isprintable() and "\\" not in value and "/jobs/" not in value
        ):
            return value
        return "".join(escape_char(char) for char in job_path.sub(r"\1\2…", value))

    class SafeLogger(Logger):
        def atoms(self, resp, req, environ, request_time):
            atoms = super().atoms(resp, req, environ, request_time)
            return {key: escape(value) for key, value in atoms.items()}

    return SafeLogger


logger_class = _safe_logger()


def _whole_head_request(max_header_bytes: int):
    """gunicorn's request, its head read whole before gunicorn parses it, in one pass.

    gunicorn's parser rescans its whole buffer on every read (a copy, a search for the
    blank line, two counts of line ends): the cost of a head grows with the square of its
    size, and while one flood is scanned every other connection of the process waits.
    Here the head is read first, each read's bytes scanned once (the search resumes where
    the last one stopped), and cut off at the gateway's limit: the request line, then
    at most ``PROXYMQ_MAX_HEADER_BYTES`` of header lines (431). gunicorn then finds the
    whole head in its buffer and parses it once, with all its own checks.
    """
    import re

    from gunicorn.http.errors import LimitRequestHeaders
    from gunicorn.http.message import MAX_REQUEST_LINE, Request

    bare_lf = re.compile(rb"(?<!\r)\n")

    class WholeHeadRequest(Request):
        def read_into(self, unreader, buf, stop=False):
            super().read_into(unreader, buf, stop)
            if stop:  # the first read of a request
                self._read_head(unreader, buf)

        def _read_head(self, unreader, buf) -> None:
            line_limit = self.limit_request_line or MAX_REQUEST_LINE
            # An empty line may come first (RFC 9112 2.2), then the request line.
            most = 2 + line_limit + 2 + max_header_bytes + 2
            scanned, end = 0, buf.find(b"\r\n\r\n")
            # A bare LF: gunicorn refuses it at once, so stop waiting for a blank line.
            while end < 0 and not bare_lf.search(buf, scanned) and len(buf) <= most:
                scanned = len(buf)
                super().read_into(unreader, buf)
                end = buf.find(b"\r\n\r\n", max(0, scanned - 3))
            start = 2 if buf.startswith(b"\r\n") else 0
            line_end = buf.find(b"\r\n", start, start + line_limit + 2)
            if line_end < 0:
                return  # a request line over its limit: gunicorn answers 414
            if (end if end >= 0 else len(buf)) - line_end > max_header_bytes:
                raise LimitRequestHeaders("request headers over the limit")

    return WholeHeadRequest


def _gateway_worker(max_header_bytes: int):
    """gunicorn's gevent worker, answering the requests its parser refuses as the gateway
    answers every error of its own: ``X-ProxyMQ-Error``, ``X-Correlation-ID`` and the
    JSON body, never gunicorn's HTML page (431 ``headers-too-large`` for the header
    limits, 400 ``bad-request`` for a malformed request line, header or chunk). gunicorn
    still picks the status, logs the refusal and writes the access log line; only what
    it would send is replaced. Defined here, not in ``gateway/``: importing that package
    builds the app, which must not happen in the master (the worker imports the
    gateway's error renderer when it answers, the app being loaded by then)."""
    import contextlib
    import uuid

    from gunicorn.http.errors import ConfigurationProblem, UnsupportedTransferCoding
    from gunicorn.http.parser import RequestParser
    from gunicorn.workers.ggevent import GeventWorker

    codes = {431: "headers-too-large", 500: "internal-error"}
    # gunicorn answers these with a 5xx, but they are the client's doing: a transfer
    # coding it does not support, a SCRIPT_NAME header that does not fit the path.
    client_faults = (ConfigurationProblem, UnsupportedTransferCoding)
    request_class = _whole_head_request(max_header_bytes)

    class Captured:
        """The client socket, but what gunicorn writes to it is kept, not sent."""

        def __init__(self, sock):
            self._sock, self.sent = sock, b""

        def sendall(self, data):
            self.sent += data

        def __getattr__(self, name):
            return getattr(self._sock, name)

    class GatewayWorker(GeventWorker):
        def init_process(self):
            # gunicorn's workers make their parser with ``http.get_parser``, which takes no
            # request class: in this process (a gateway worker's), every request's head
            # is read by ``WholeHeadRequest``.
            RequestParser.mesg_class = request_class
            super().init_process()

        def handle_error(self, req, client, addr, exc):
            from gateway.answers import error_answer, status_line
            from gateway.errors import GatewayError

            captured = Captured(client)
            super().handle_error(req, captured, addr, exc)
            # gunicorn wrote "HTTP/1.1 <status> <reason>\r\n...": keep its status.
            parts = captured.sent.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                return
            status, reason = int(parts[1]), parts[2]
            if isinstance(exc, client_faults):
                status, reason = 400, "Bad Request"
            code = codes.get(status, "bad-request")
            message = "request headers over the limit" if code == codes[431] else reason
            answer = error_answer(GatewayError(status, code, message), str(uuid.uuid4()))
            head = "".join(
                [
                    f"HTTP/1.1 {status_line(answer.status)}\r\n",
                    *(f"{name}: {value}\r\n" for name, value in answer.headers),
                    "Connection: close\r\n\r\n",
                ]
            )
            with contextlib.suppress(OSError):  # a client that has gone is told nothing
                client.sendall(head.encode("latin-1") + answer.body)

    return GatewayWorker


worker_connections = 2000
# Idle keep-alive connections hold a graceful shutdown until they time out, so short.
keepalive = 5
# Several gunicorns (gateway, fetcher) run side by side; the shared control socket
# path would make them fight over it, and nothing here uses it.
control_socket_disable = True

from proxymq import tracing  # noqa: E402 -- imports no OpenTelemetry until set up

if _serving("fetcher"):
    from fetcher.config import ConfigError, FetcherConfig

    _service_name = tracing.FETCHER
    try:
        _config = FetcherConfig.from_env(os.environ)
        tracing.check(os.environ)
    except ConfigError as error:
        _stop(error)
    bind = [_config.bind]
elif _serving("examples.words"):
    # The streaming example: gevent workers (a sleeping stream yields), nothing else of
    # the gateway's (no tracing either); bind with -b, else WORDS_BIND.
    _service_name = None
    bind = [os.environ.get("WORDS_BIND", "0.0.0.0:8090")]
else:
    from proxymq.config import ConfigError, GatewayConfig, check_broker_certificate

    _service_name = tracing.GATEWAY
    try:
        _config = GatewayConfig.from_env(os.environ)
        tracing.check(os.environ)
        # A broker certificate that does not verify would fail every worker's every
        # reconnect; one line from the master instead (a broker that is down is no error).
        if _config.broker_tls is not None:
            check_broker_certificate(_config.broker_tls)
    except ConfigError as error:
        _stop(error)
    bind = [_config.bind]
    # One header may use the whole of PROXYMQ_MAX_HEADER_BYTES (a large JWT or cookie);
    # the head in all is cut off at that limit as it is read (_whole_head_request).
    limit_request_field_size = _config.max_header_bytes
    limit_request_fields = 100
    # The gateway reads the raw target (RAW_URI); a SCRIPT_NAME or PATH_INFO header from
    # a "trusted" peer (gunicorn trusts 127.0.0.1 by default) means nothing to it.
    forwarder_headers = ""
    worker_class = _gateway_worker(_config.max_header_bytes)
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

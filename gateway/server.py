"""The gateway under gunicorn: its settings, read once, and gunicorn's worker and logger.

``gunicorn.conf.py`` calls ``configure`` in gunicorn's master before any worker starts:
the settings are parsed there, once, and a bad one stops the master with one line
(gunicorn respawns a worker that dies at import forever). The workers are forked from
the master and find the parsed settings here (``settings``), so no gateway process
parses them twice.

Importing this module imports no app, no Flask, no redis (gevent patches the workers
after the fork) and no metrics client (prometheus_client reads
``PROMETHEUS_MULTIPROC_DIR`` when it is first imported, which ``configure`` sets).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
import uuid

from gunicorn.glogging import Logger
from gunicorn.http.errors import (
    ConfigurationProblem,
    LimitRequestHeaders,
    UnsupportedTransferCoding,
)
from gunicorn.http.message import MAX_REQUEST_LINE, Request
from gunicorn.http.parser import RequestParser
from gunicorn.workers.ggevent import GeventWorker

from gateway import errors
from proxymq.broker_tls import check_broker_certificate
from proxymq.config import GatewayConfig
from proxymq.parsers import ConfigError


@functools.cache
def settings() -> GatewayConfig:
    """The process's settings, parsed once: in gunicorn's master (``configure``), whose
    workers inherit them; at first use anywhere else."""
    return GatewayConfig.from_env(os.environ)


def configure(cfg) -> None:
    """Check the gateway's settings and set gunicorn's from them (``cfg`` is gunicorn's
    ``Config``); a bad setting exits with one line naming the variable."""
    from proxymq import tracing

    try:
        config = settings()
        tracing.check(os.environ)
        # A broker certificate that does not verify would fail every worker's every
        # reconnect; one line from the master instead (a broker that is down is no error).
        if config.broker_tls is not None:
            check_broker_certificate(config.broker_tls)
    except ConfigError as error:
        sys.stderr.write(f"Error: {error}\n")
        sys.exit(1)
    cfg.set("worker_class", GatewayWorker)
    # One header may use the whole of PROXYMQ_MAX_HEADER_BYTES (a large JWT or cookie);
    # the head in all is cut off at that limit as it is read (WholeHeadRequest).
    cfg.set("limit_request_field_size", config.max_header_bytes)
    cfg.set("limit_request_fields", 100)
    # The gateway reads the raw target (RAW_URI); a SCRIPT_NAME or PATH_INFO header from
    # a "trusted" peer (gunicorn trusts 127.0.0.1 by default) means nothing to it.
    cfg.set("forwarder_headers", "")
    # A SIGTERMed worker answers the requests it holds before it exits.
    cfg.set("graceful_timeout", int(config.reply_timeout) + 5)
    # Metrics of all worker processes meet in one directory (prometheus_client's
    # multiprocess mode); it must exist, empty, before any worker imports the client.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="proxymq-metrics-")


class SafeLogger(Logger):
    """gunicorn's logger, with every access-log field made safe to write.

    Request lines, paths and headers are the client's: ``%(U)s`` is the *decoded* path,
    so ``%0d%0a`` in it would start a forged log line, and a terminal escape in a
    User-Agent would reach whoever reads the log. Control characters and backslashes are
    escaped (quotes gunicorn escapes itself), and job ids in ``/jobs/<id>`` paths are
    replaced by ``…``: a job id is a secret, held by its client alone.
    """

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        return {key: _escape(value) for key, value in atoms.items()}


_JOB_PATH = re.compile(r"(^|\s)(/jobs/)[^/?\s]+")  # the gateway's /jobs/, not a service's


def _escape(value):
    if not isinstance(value, str) or (
        value.isprintable() and "\\" not in value and "/jobs/" not in value
    ):
        return value
    return "".join(_escape_char(char) for char in _JOB_PATH.sub(r"\1\2…", value))


def _escape_char(char: str) -> str:
    if char == "\\":
        return "\\\\"
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


_BARE_LF = re.compile(rb"(?<!\r)\n")


class WholeHeadRequest(Request):
    """gunicorn's request, its head read whole before gunicorn parses it, in one pass.

    gunicorn's parser rescans its whole buffer on every read (a copy, a search for the
    blank line, two counts of line ends): the cost of a head grows with the square of its
    size, and while one flood is scanned every other connection of the process waits.
    Here the head is read first, each read's bytes scanned once (the search resumes where
    the last one stopped), and cut off at the gateway's limit: the request line, then
    at most ``PROXYMQ_MAX_HEADER_BYTES`` of header lines (431). gunicorn then finds the
    whole head in its buffer and parses it once, with all its own checks.
    """

    def read_into(self, unreader, buf, stop=False):
        super().read_into(unreader, buf, stop)
        if stop:  # the first read of a request
            self._read_head(unreader, buf)

    def _read_head(self, unreader, buf) -> None:
        max_header_bytes = settings().max_header_bytes
        line_limit = self.limit_request_line or MAX_REQUEST_LINE
        # An empty line may come first (RFC 9112 2.2), then the request line.
        most = 2 + line_limit + 2 + max_header_bytes + 2
        scanned, end = 0, buf.find(b"\r\n\r\n")
        # A bare LF: gunicorn refuses it at once, so stop waiting for a blank line.
        while end < 0 and not _BARE_LF.search(buf, scanned) and len(buf) <= most:
            scanned = len(buf)
            super().read_into(unreader, buf)
            end = buf.find(b"\r\n\r\n", max(0, scanned - 3))
        start = 2 if buf.startswith(b"\r\n") else 0
        line_end = buf.find(b"\r\n", start, start + line_limit + 2)
        if line_end < 0:
            return  # a request line over its limit: gunicorn answers 414
        if (end if end >= 0 else len(buf)) - line_end > max_header_bytes:
            raise LimitRequestHeaders("request headers over the limit")


class _Captured:
    """The client socket, but what gunicorn writes to it is kept, not sent."""

    def __init__(self, sock) -> None:
        self._sock, self.sent = sock, b""

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def __getattr__(self, name):
        return getattr(self._sock, name)


# gunicorn answers these with a 5xx, but they are the client's doing: a transfer coding
# it does not support, a SCRIPT_NAME header that does not fit the path.
_CLIENT_FAULTS = (ConfigurationProblem, UnsupportedTransferCoding)


class GatewayWorker(GeventWorker):
    """gunicorn's gevent worker, answering the requests its parser refuses as the gateway
    answers every error of its own (``answers.error_answer``): ``X-ProxyMQ-Error``,
    ``X-Correlation-ID`` and the JSON body, never gunicorn's HTML page (431
    ``headers-too-large`` for the header limits, 500 ``internal-error``, else
    ``bad-request`` with gunicorn's status: a malformed request line, header or chunk).
    gunicorn still picks the status, logs the refusal and writes the access log line;
    only what it would send is replaced."""

    def init_process(self):
        # gunicorn's workers make their parser with ``http.get_parser``, which takes no
        # request class: in this process (a gateway worker's), every request's head is
        # read by ``WholeHeadRequest``.
        RequestParser.mesg_class = WholeHeadRequest
        super().init_process()

    def handle_error(self, req, client, addr, exc):
        # Imported here, in the worker: the master imports this module (its logger
        # class), and the renderer's imports (the job store's redis) must come after
        # gevent patched the process.
        from gateway.answers import error_answer, status_line

        captured = _Captured(client)
        super().handle_error(req, captured, addr, exc)
        # gunicorn wrote "HTTP/1.1 <status> <reason>\r\n...": keep its status.
        parts = captured.sent.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return
        status, reason = int(parts[1]), parts[2]
        if isinstance(exc, _CLIENT_FAULTS):
            status, reason = 400, "Bad Request"
        if status == errors.HEADERS_TOO_LARGE.status:
            error = errors.HEADERS_TOO_LARGE("request headers over the limit")
        elif status == errors.INTERNAL_ERROR.status:
            error = errors.INTERNAL_ERROR(reason)
        else:
            error = errors.BAD_REQUEST(reason, status)
        answer = error_answer(error, str(uuid.uuid4()))
        head = "".join(
            [
                f"HTTP/1.1 {status_line(answer.status)}\r\n",
                *(f"{name}: {value}\r\n" for name, value in answer.headers),
                "Connection: close\r\n\r\n",
            ]
        )
        with contextlib.suppress(OSError):  # a client that has gone is told nothing
            client.sendall(head.encode("latin-1") + answer.body)

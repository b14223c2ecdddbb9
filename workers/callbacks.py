"""Job callbacks: POST a finished job's answer to the URL its client named.

The URL comes from a client, so the connection is guarded (``proxymq.outbound``, as the
fetcher's): it never reaches loopback, private or link-local addresses (checked on the
address actually connected to) unless ``PROXYMQ_CALLBACK_ALLOW_PRIVATE=true``.

A receiver is not trusted to behave either. Callbacks are sent by threads of their own,
after the job's answer is stored and its message acknowledged, so a slow receiver holds
no call thread and no request. Each attempt has a total deadline: the socket is shut at
``TIMEOUT`` seconds whatever the receiver trickles. Only its status line and headers
are read (http.client bounds those), never its body. Redirects are not followed: the
signature and the result go to the URL the client named, or nowhere.

With ``PROXYMQ_CALLBACK_SECRET`` set, ``X-ProxyMQ-Signature: t=<unix seconds>,v1=<hex>``
carries the HMAC-SHA256 of ``"<t>." + body``: the receiver checks it and refuses an old
``t``, so a captured callback cannot be replayed later.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import queue
import socket
import threading
import time
from urllib.parse import urlsplit

from proxymq import outbound
from proxymq.envelope import ReplyEnvelope

log = logging.getLogger(__name__)

ATTEMPTS = 3
TIMEOUT = 10.0  # seconds for one whole attempt: connect, send, status and headers
THREADS = 4
BACKLOG = 1000  # callbacks waiting for a thread; beyond, they are dropped and logged
# What callbacks have sent since they borrowed the fetcher's session; receivers may match
# on it, so renaming it is a change of its own.
USER_AGENT = "proxymq-fetcher/0.1"


def payload(correlation_id: str, reply: ReplyEnvelope) -> bytes:
    """The job's answer; it names the job by the correlation id the 202 answer gave
    (``X-Correlation-ID``), never by the job id, which is the client's secret."""
    body: dict = {"correlation_id": correlation_id, "status": reply.status}
    body["headers"] = reply.headers
    if reply.error:
        body["error"] = reply.error
        body["message"] = reply.message
    try:
        body["body"] = reply.body.decode()
    except UnicodeDecodeError:
        body["body_base64"] = base64.b64encode(reply.body).decode()
    return json.dumps(body).encode()


def signature(secret: str, body: bytes, timestamp: int) -> str:
    signed = f"{timestamp}.".encode() + body
    return f"t={timestamp},v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"


def loggable(url: str) -> str:
    """The URL for a log line: without userinfo or query (either may hold a credential),
    and ``repr``-escaped, so a client's control characters cannot forge log lines."""
    parts = urlsplit(url)
    where = parts.hostname or ""
    with contextlib.suppress(ValueError):
        if parts.port:
            where += f":{parts.port}"
    return repr(f"{parts.scheme}://{where}{parts.path}")


class CallbackSender:
    def __init__(self, secret: str | None, allow_private: bool) -> None:
        self._secret = secret
        self._policy = outbound.policy_for(allow_private)
        self._waiting: queue.Queue = queue.Queue(BACKLOG)
        for number in range(THREADS):
            name = f"proxymq-callback-{number}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    def send(self, url: str, correlation_id: str, reply: ReplyEnvelope) -> None:
        """Queue the callback and return at once (the answer is already stored)."""
        try:
            self._waiting.put_nowait((url, correlation_id, payload(correlation_id, reply)))
        except queue.Full:
            log.warning(
                "callback %s for %s dropped: %d waiting", loggable(url), correlation_id, BACKLOG
            )

    def _serve(self) -> None:
        while True:
            url, correlation_id, body = self._waiting.get()
            try:
                self.deliver(url, correlation_id, body)
            except Exception:  # a bug must not stop the thread
                log.exception("callback for %s failed", correlation_id)

    def deliver(self, url: str, correlation_id: str, body: bytes) -> bool:
        """POST ``body``, retrying with backoff; False when no attempt got a 2xx."""
        for attempt in range(ATTEMPTS):
            try:
                status = self._post(url, correlation_id, body)
                if 200 <= status < 300:
                    return True
                problem = f"HTTP {status}"
            except Exception as exc:  # a client-named URL may fail in any way: log, retry
                problem = type(exc).__name__
            log.warning("callback %s for %s failed (%s)", loggable(url), correlation_id, problem)
            if attempt + 1 < ATTEMPTS:
                time.sleep(0.5 * 2**attempt)
        return False

    def _post(self, url: str, correlation_id: str, body: bytes) -> int:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Correlation-ID": correlation_id,
        }
        if self._secret:
            headers["X-ProxyMQ-Signature"] = signature(self._secret, body, int(time.time()))
        connection = outbound.connection(
            parts.scheme, parts.hostname or "", parts.port, self._policy, TIMEOUT
        )
        deadline = threading.Timer(TIMEOUT, _cut, [connection])
        deadline.start()
        try:
            connection.request("POST", target, body=body, headers=headers)
            return connection.getresponse().status
        finally:
            deadline.cancel()
            connection.close()


def _cut(connection) -> None:
    """The deadline: shut the socket under whatever read or write is waiting on it."""
    sock = connection.read_socket
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

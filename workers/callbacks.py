"""Job callbacks: POST a finished job's answer to the URL its client named.

The URL comes from a client, so the request goes through the guarded session of
``proxymq.outbound`` (the one the fetcher uses too): it never connects to loopback,
private or link-local addresses (checked on the address actually connected to) unless
``PROXYMQ_CALLBACK_ALLOW_PRIVATE=true``. With
``PROXYMQ_CALLBACK_SECRET`` set, ``X-ProxyMQ-Signature: sha256=<hex>`` is the HMAC-SHA256
of the body, so the receiver can tell the callback came from ProxyMQ.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time

from proxymq.envelope import ReplyEnvelope
from proxymq.outbound import build_session, policy_for

log = logging.getLogger(__name__)

ATTEMPTS = 3
TIMEOUT = 10.0
# What callbacks have sent since they borrowed the fetcher's session; receivers may match
# on it, so renaming it is a change of its own, not part of moving the session.
USER_AGENT = "proxymq-fetcher/0.1"


def payload(job_id: str, reply: ReplyEnvelope) -> bytes:
    body: dict = {"id": job_id, "status": reply.status, "headers": reply.headers}
    if reply.error:
        body["error"] = reply.error
        body["message"] = reply.message
    try:
        body["body"] = reply.body.decode()
    except UnicodeDecodeError:
        body["body_base64"] = base64.b64encode(reply.body).decode()
    return json.dumps(body).encode()


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class CallbackSender:
    def __init__(self, secret: str | None, allow_private: bool) -> None:
        self._secret = secret
        self._http = build_session(policy_for(allow_private), pool_size=4, user_agent=USER_AGENT)

    def send(self, url: str, job_id: str, reply: ReplyEnvelope) -> bool:
        """POST the answer, retrying failures with backoff; False when it never got a 2xx."""
        body = payload(job_id, reply)
        headers = {"Content-Type": "application/json", "X-ProxyMQ-Job-ID": job_id}
        if self._secret:
            headers["X-ProxyMQ-Signature"] = signature(self._secret, body)
        for attempt in range(ATTEMPTS):
            try:
                response = self._http.post(url, data=body, headers=headers, timeout=TIMEOUT)
                if response.ok:
                    return True
                problem = f"HTTP {response.status_code}"
            except Exception as exc:  # a client-named URL may fail in any way: log, retry
                problem = repr(exc)
            log.warning("callback %s for job %s failed (%s)", url, job_id, problem)
            time.sleep(0.5 * 2**attempt)
        return False

"""The client's controls read from request headers: priority, ``Prefer: wait``, and the
idempotency key (docs/client-controls.md)."""

from __future__ import annotations

import re

from gateway import errors
from gateway.incoming import header
from proxymq.headers import Headers

PRIORITY_HEADER = "X-ProxyMQ-Priority"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# AMQP's priority is an octet; RabbitMQ treats one above the queue's x-max-priority as
# that maximum, and ignores priorities on a queue without one.
MAX_PRIORITY = 255
_DIGITS = re.compile(r"[0-9]{1,3}")
_WAIT = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")
# The IETF draft's key is a Structured Field String: printable ASCII. 255 is plenty.
_KEY = re.compile(r'"?([\x20-\x7e]{1,255}?)"?')


def priority(headers: Headers, allowed: int | None) -> int | None:
    """``X-ProxyMQ-Priority: 0..255`` as the message priority, at most ``allowed``
    (``PROXYMQ_MAX_CLIENT_PRIORITY``); 400 for anything else.

    The gateway does not know who its clients are, so by default (``allowed`` None) the
    header is not even read: any client could otherwise put its requests before
    everyone's. Whoever sets the setting decides who may send the header (docs/security.md).
    """
    value = header(headers, PRIORITY_HEADER) if allowed is not None else None
    if value is None:
        return None
    value = value.strip()
    if not _DIGITS.fullmatch(value) or int(value) > MAX_PRIORITY:
        raise errors.bad_request(f"{PRIORITY_HEADER} must be an integer from 0 to {MAX_PRIORITY}")
    return min(int(value), allowed)


def idempotency_key(headers: Headers) -> str | None:
    """The ``Idempotency-Key`` (quotes of the draft's sf-string form dropped); 400 when
    it is empty, too long or not printable ASCII."""
    value = header(headers, IDEMPOTENCY_HEADER)
    if value is None:
        return None
    match = _KEY.fullmatch(value.strip())
    if match is None or not match.group(1).strip():
        raise errors.bad_request(
            f"{IDEMPOTENCY_HEADER} must be 1 to 255 printable ASCII characters"
        )
    return match.group(1)


def preferred_wait(headers: Headers, limit: float) -> float | None:
    """RFC 7240's ``wait=<seconds>`` preference, at most ``limit``; None when absent.

    A malformed value is ignored, as RFC 7240 asks of preferences a server cannot honour.
    """
    preferences = ",".join(v for n, v in headers if n.lower() == "prefer")
    for preference in preferences.split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        if name.strip().lower() == "wait":
            value = value.strip().strip('"')
            if _WAIT.fullmatch(value):
                return min(float(value), limit)
    return None

"""``Retry-After`` as seconds from now: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""

from __future__ import annotations

import email.utils
import time


def seconds(headers: list[tuple[str, str]]) -> float | None:
    """Seconds the answer asks to wait, or None when it names no usable wait."""
    value = next((v.strip() for n, v in headers if n.lower() == "retry-after"), None)
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())

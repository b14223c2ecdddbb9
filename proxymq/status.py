"""A service's state as the workers announce it and the gateways read it.

Workers publish one ``Status`` per service they serve on the fanout exchange
``proxymq.status``, every ``INTERVAL`` seconds and at once on a change of its breaker or
pause (``workers.announcer``); each gateway process reads them all on its broker link and
answers synchronous requests that cannot be served in time at once
(``gateway.service_state``). JSON, so any tool can read (and a test can write) one; the
format is the contract between the two sides, so both import it from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

EXCHANGE = "proxymq.status"
EXCHANGE_TYPE = "fanout"
CONTENT_TYPE = "application/json"
INTERVAL = 2.0  # seconds between two announcements of a service by a worker
MAX_AGE = 10.0  # seconds after which a state counts as unknown (its worker is gone)
MAX_BYTES = 4096  # a status is a few hundred bytes; a larger message is no status
# Beyond any epoch time, rate or depth; sums and quotients of such numbers stay finite
# (JSON allows integers no float holds, and an exception on the reader drops the link).
MAX_NUMBER = 1e12


@dataclass(frozen=True, slots=True)
class Status:
    """One worker's view of one service, at ``sent_at`` (epoch seconds)."""

    service: str
    worker: str  # the worker's node name: several workers serve one service
    sent_at: float
    breaker_open_until: float | None  # epoch seconds; None: closed
    paused_until: float | None  # epoch seconds; None: not paused
    drain_rate: float  # requests taken off the queue per second, smoothed
    depth: int  # messages ready in the service's queue, as the broker counted them
    held: int  # messages this worker took but has not started calling yet

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


class BadStatus(ValueError):
    """A message on the status exchange that is not a ``Status``."""


def decode(body: bytes) -> Status:
    """The ``Status`` in ``body``; ``BadStatus`` for anything else (a status message may
    come from anyone allowed to publish to the exchange, so every field is checked)."""
    if len(body) > MAX_BYTES:
        raise BadStatus("too large")
    try:
        fields = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadStatus(f"not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise BadStatus("not an object")
    try:
        return Status(
            service=_text(fields["service"]),
            worker=_text(fields["worker"]),
            sent_at=_number(fields["sent_at"]),
            breaker_open_until=_optional(fields.get("breaker_open_until")),
            paused_until=_optional(fields.get("paused_until")),
            drain_rate=_number(fields["drain_rate"]),
            depth=int(_number(fields["depth"])),
            held=int(_number(fields.get("held", 0))),
        )
    except KeyError as exc:
        raise BadStatus(f"no {exc.args[0]!r}") from None


def _text(value) -> str:
    if not isinstance(value, str) or not value or len(value) > 255:
        raise BadStatus("a name must be a non-empty string")
    return value


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadStatus("not a number")
    if not 0 <= value <= MAX_NUMBER:  # NaN fails too; a huge int is compared, not converted
        raise BadStatus(f"not a number from 0 to {MAX_NUMBER:g}")
    return float(value)


def _optional(value) -> float | None:
    return None if value is None else _number(value)

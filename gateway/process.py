"""``Gateway``: what one gateway process serves with, made once by ``gateway.factory.create_app``.

Its own module so that every part of the gateway can name it without importing the
routes (``app.extensions["proxymq"]`` holds it, as Flask's extensions do).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.broker import BrokerLink
from proxymq.config import GatewayConfig
from proxymq.idempotency import IdempotencyStore
from proxymq.jobs import JobStore


@dataclass(frozen=True, slots=True)
class Gateway:
    """The process's configuration, broker link, job store and idempotency store (the
    stores None without ``PROXYMQ_RESULT_URL``)."""

    config: GatewayConfig
    link: BrokerLink
    store: JobStore | None
    idempotency: IdempotencyStore | None = None

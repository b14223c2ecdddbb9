"""What a worker process holds while it serves: configuration, HTTP pool, publisher, health.

Built once, when the worker starts and its queues (``-Q``) are known; tasks reach it
through ``current()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from proxymq.config import WorkerConfig
from proxymq.jobs import JobStore
from workers import forwarding
from workers.callbacks import CallbackSender
from workers.health import HealthGate
from workers.publisher import Publisher


@dataclass(frozen=True, slots=True)
class Runtime:
    config: WorkerConfig
    http: requests.Session
    publisher: Publisher
    health: HealthGate
    jobs: JobStore | None
    callbacks: CallbackSender


_current: Runtime | None = None


def start(config: WorkerConfig, concurrency: int) -> Runtime:
    global _current
    _current = Runtime(
        config=config,
        http=forwarding.session(concurrency),
        publisher=Publisher(config.broker_url, concurrency),
        health=HealthGate(config.services),
        jobs=JobStore(config.result_url, config.job_ttl) if config.result_url else None,
        callbacks=CallbackSender(config.callback_secret, config.callback_allow_private),
    )
    return _current


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("the ProxyMQ worker runtime was not started (celeryd_init)")
    return _current

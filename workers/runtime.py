"""What a worker process holds while it serves: configuration, HTTP pool, job store,
callbacks, health gate.

Built once, when the worker starts and its queues (``-Q``) are known (``workers.app``),
and handed to the consumer step through Celery's worker object (``Worker.proxymq``).
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from proxymq.config import WorkerConfig
from proxymq.jobs import JobStore
from workers import forwarding
from workers.callbacks import CallbackSender
from workers.flow import Flow, flows
from workers.health import HealthGate


@dataclass(frozen=True, slots=True)
class Runtime:
    config: WorkerConfig
    concurrency: int  # downstream calls at once: Celery's -c
    http: requests.Session  # batch calls
    connections: forwarding.Connections  # single calls
    health: HealthGate
    jobs: JobStore | None
    callbacks: CallbackSender
    flows: dict[str, Flow]  # by service name (workers.flow)

    @classmethod
    def build(cls, config: WorkerConfig, concurrency: int) -> Runtime:
        return cls(
            config=config,
            concurrency=concurrency,
            http=forwarding.session(concurrency),
            connections=forwarding.Connections(),
            health=HealthGate(config.services),
            jobs=JobStore(config.result_url, config.job_ttl) if config.result_url else None,
            callbacks=CallbackSender(config.callback_secret, config.callback_allow_private),
            flows=flows(config),
        )

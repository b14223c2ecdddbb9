"""What a worker process holds while it serves: its configuration, HTTP pool, reply producer.

Built once, when the worker starts and its queues (``-Q``) are known; tasks reach it
through ``current()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from proxymq.config import WorkerConfig
from workers import forwarding
from workers.replies import ReplyPublisher


@dataclass(frozen=True, slots=True)
class Runtime:
    config: WorkerConfig
    http: requests.Session
    replies: ReplyPublisher


_current: Runtime | None = None


def start(config: WorkerConfig, concurrency: int) -> Runtime:
    global _current
    _current = Runtime(
        config=config,
        http=forwarding.session(concurrency),
        replies=ReplyPublisher(config.broker_url, concurrency),
    )
    return _current


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("the ProxyMQ worker runtime was not started (celeryd_init)")
    return _current

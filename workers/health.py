"""Downstream health gating: consume a service's queue only while its service is healthy.

With ``health_url`` set, a thread polls it; while it does not answer 2xx the worker stops
consuming that service's queue (through Celery's own ``cancel_consumer`` remote control,
addressed to this worker, so the consumer thread makes the change itself) and resumes
with ``add_consumer`` when it recovers. A request taken while unhealthy (it was
prefetched before the switch) is published again with its count unchanged
(``workers.admission``): back in the queue, unanswered and unlost. At start, a gated service
counts as unhealthy until its first good answer.
"""

from __future__ import annotations

import logging
import threading

import requests
from celery import Celery

from proxymq.config import ServiceConfig

log = logging.getLogger(__name__)

INTERVAL = 2.0  # seconds between health checks
CHECK_TIMEOUT = 2.0


class HealthGate:
    def __init__(self, services: dict[str, ServiceConfig]) -> None:
        self._gated = {name: s for name, s in services.items() if s.health_url}
        self._healthy = dict.fromkeys(self._gated, False)
        self._stop = threading.Event()

    def healthy(self, service: str) -> bool:
        return self._healthy.get(service, True)

    def start(self, app: Celery, hostname: str) -> None:
        if not self._gated:
            return
        for service in self._gated.values():  # consume nothing until the first good check
            self._switch(app, hostname, service, healthy=False)
        threading.Thread(target=self._run, args=(app, hostname), daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, app: Celery, hostname: str) -> None:
        http = requests.Session()
        http.trust_env = False
        while not self._stop.is_set():
            for name, service in self._gated.items():
                healthy = _check(http, service.health_url)
                if healthy != self._healthy[name]:
                    self._healthy[name] = healthy
                    self._switch(app, hostname, service, healthy)
            self._stop.wait(INTERVAL)

    @staticmethod
    def _switch(app: Celery, hostname: str, service: ServiceConfig, healthy: bool) -> None:
        log.warning(
            "%s is %s: %s consuming %s",
            service.name,
            "healthy" if healthy else "unhealthy",
            "resuming" if healthy else "stopping",
            service.queue,
        )
        if healthy:
            app.control.add_consumer(service.queue, destination=[hostname], reply=False)
        else:
            app.control.cancel_consumer(service.queue, destination=[hostname], reply=False)


def _check(http: requests.Session, url: str) -> bool:
    try:
        response = http.get(url, timeout=CHECK_TIMEOUT, allow_redirects=False)
        return 200 <= response.status_code < 300
    except requests.RequestException:
        return False

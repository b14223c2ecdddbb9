"""Flow control: how fast and how much each service is called, across all its workers.

SPEC.md's "Flow control: protecting the service". One ``Flow`` per service
(``workers.flow.gate``), called by the pipeline at one seam; the parts each do one job:
``leases`` (the concurrency cap), ``rate`` (the rate limit), ``state`` (pause and
breaker, readable by others), ``shared`` (Redis, and the fallback without it).
"""

from __future__ import annotations

from proxymq.config import WorkerConfig
from workers.flow.gate import FREE, UNCALLED, CallOutcome, Flow, Permit
from workers.flow.shared import Shared
from workers.flow.state import FlowState

__all__ = ["FREE", "UNCALLED", "CallOutcome", "Flow", "FlowState", "Permit", "flows"]


def flows(config: WorkerConfig) -> dict[str, Flow]:
    """Each served service's ``Flow``, by service name. With ``PROXYMQ_RESULT_URL`` they
    share their state with the service's other workers (pauses, and the limits, which
    need it: ``proxymq.config`` refuses one without it)."""
    shared = None
    if config.result_url is not None:
        shared = Shared(config.result_url, list(config.services))
    result = {name: Flow(service, shared) for name, service in config.services.items()}
    if shared is not None:
        shared.start()
    return result

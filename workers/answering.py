"""A job's side of answering: the result store and the callback, in a call thread.

A synchronous request's answer goes to its gateway's reply queue, published from the
consumer thread (``workers.pipeline``). A job's goes to the result store, a network call
that must not stall the consumer thread, so it runs here, in the call thread that made
the downstream call; its callback is then queued for the callback threads
(``workers.callbacks``), so a slow receiver holds neither this thread nor the message.
"""

from __future__ import annotations

import logging

from proxymq.envelope import ReplyEnvelope
from workers import metrics
from workers.delivery import Delivery
from workers.runtime import Runtime

log = logging.getLogger(__name__)


def start_job(runtime: Runtime, delivery: Delivery) -> bool:
    """Mark the job running; False (skip it) when it was cancelled or forgotten."""
    assert runtime.jobs is not None  # admission holds jobs on workers without a store
    if runtime.jobs.start(delivery.correlation_id):
        return True
    log.info(
        "skipped job %s of %s: cancelled or forgotten",
        delivery.correlation_id,
        delivery.service.name,
    )
    metrics.jobs_total.labels(delivery.service.name, "skipped").inc()
    return False


def finish_job(runtime: Runtime, delivery: Delivery, reply: ReplyEnvelope) -> None:
    """Store the answer (a job cancelled or forgotten meanwhile stays so) and queue the
    job's callback. Raises when the store cannot be reached: unanswered, the
    request goes back to its queue."""
    assert runtime.jobs is not None
    correlation_id, service = delivery.correlation_id, delivery.service.name
    if not runtime.jobs.finish(correlation_id, reply):
        return
    failed = reply.error is not None or reply.status >= 500
    metrics.jobs_total.labels(service, "failed" if failed else "completed").inc()
    if delivery.request.callback:
        runtime.callbacks.send(delivery.request.callback, correlation_id, reply)

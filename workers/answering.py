"""A job's side of answering: the result store and the callback, in a call thread.

A synchronous request's answer goes to its gateway's reply queue, published from the
consumer thread (``workers.pipeline``). A job's goes to the result store, a network call
that must not stall the consumer thread, so it runs here, in the call thread that made
the downstream call; its callback is then published to the broker by the consumer
thread (``workers.callback_queue``), so a slow receiver holds neither this thread nor
the message.
"""

from __future__ import annotations

import logging

from proxymq.envelope import ReplyEnvelope
from workers import metrics
from workers.delivery import Delivery
from workers.observers import observe
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
    observe(metrics.count, metrics.jobs_total, delivery.service.name, "skipped")
    return False


def unsent_callback(runtime: Runtime, delivery: Delivery) -> ReplyEnvelope | None:
    """For a skipped job: its stored answer when its callback is due but was never tried
    (and its owner in ``delivery.submitter``, whom the callback is fair to).

    A worker that stored the answer and died before the broker held the callback leaves
    the request to be delivered again; the job is done, so it is not run again, but its
    callback is published now. (Had the callback been published and not yet tried, the
    receiver gets it twice: at least once, as every retry.)"""
    if not delivery.request.callback:
        return None
    try:
        unsent = runtime.jobs.unsent_callback(delivery.correlation_id)
    except Exception as exc:  # the store went away: the job's answer is there anyway
        log.warning("could not check the callback of %s: %r", delivery.correlation_id, exc)
        return None
    if unsent is None:
        return None
    reply, delivery.submitter = unsent
    return reply


def finish_job(runtime: Runtime, delivery: Delivery, reply: ReplyEnvelope) -> bool:
    """Store the answer (a job cancelled or forgotten meanwhile stays so); True when the
    job's callback is due (the consumer thread publishes it, ``workers.callback_queue``,
    for the job's owner, which the store answers with: ``delivery.submitter``).
    Raises when the store cannot be reached: unanswered, the request goes back to its
    queue."""
    assert runtime.jobs is not None
    correlation_id, service = delivery.correlation_id, delivery.service.name
    owner = runtime.jobs.finish(correlation_id, reply)
    if owner is None:
        return False
    delivery.submitter = owner
    failed = reply.error is not None or reply.status >= 500
    observe(metrics.count, metrics.jobs_total, service, "failed" if failed else "completed")
    return bool(delivery.request.callback)

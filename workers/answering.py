"""Where an answer goes: a job's to the result store (and its callback), others to the
gateway's reply queue. Single mode (``workers.tasks``) and batch mode
(``workers.batching``) both answer through here."""

from __future__ import annotations

import logging

from proxymq.envelope import ReplyEnvelope, RequestEnvelope
from workers import metrics
from workers.runtime import Runtime

log = logging.getLogger(__name__)


class NoResultStore(Exception):
    """A job reached a worker without PROXYMQ_RESULT_URL; it must go back to the queue."""


def answer(
    state: Runtime,
    request: RequestEnvelope | None,
    correlation_id: str,
    reply_to: str | None,
    reply: ReplyEnvelope,
) -> None:
    if request is not None and request.job:
        finish_job(state, request.service, correlation_id, reply, request.callback)
    elif reply_to:
        state.publisher.reply(reply_to, correlation_id, reply)


def start_job(state: Runtime, service: str, job_id: str) -> bool:
    """Mark the job running; False (skip it) when it was cancelled or forgotten."""
    if state.jobs is None:
        raise NoResultStore("a job needs PROXYMQ_RESULT_URL on the worker")
    if state.jobs.start(job_id):
        return True
    log.info("skipped job %s of %s: cancelled or forgotten", job_id, service)
    metrics.jobs_total.labels(service, "skipped").inc()
    return False


def finish_job(
    state: Runtime, service: str, job_id: str, reply: ReplyEnvelope, callback: str | None
) -> None:
    if state.jobs is None:
        raise NoResultStore("a job needs PROXYMQ_RESULT_URL on the worker")
    if not state.jobs.finish(job_id, reply):
        return  # cancelled or forgotten meanwhile
    failed = reply.error is not None or reply.status >= 500
    metrics.jobs_total.labels(service, "failed" if failed else "completed").inc()
    if callback:
        state.callbacks.send(callback, job_id, reply)

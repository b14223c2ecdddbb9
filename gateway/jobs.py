"""Asynchronous jobs on the gateway: 202 now, the answer later from ``/jobs/<id>``.

A request with ``Prefer: respond-async`` is published like any other, but persistent,
without a reply queue, and with ``PROXYMQ_JOB_TIMEOUT`` as its deadline; the worker puts
the answer into the result store (``proxymq.jobs``), where any gateway process or replica
finds it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import gevent
import redis

from gateway import errors, idempotency, metrics
from gateway.answers import Answer, job_accepted, json_answer, reply_answer
from gateway.broker import BrokerUnavailable
from gateway.outgoing import publish
from gateway.request import ProxyRequest
from gateway.service_state import ServiceStates
from proxymq.envelope import RequestEnvelope
from proxymq.jobs import CANCELLED, DONE, QUEUED, Job, JobStore, new_job_id, owner_hash

if TYPE_CHECKING:
    from gateway.process import Gateway

PUBLISH_TIMEOUT = 10.0


def unknown_job() -> errors.GatewayError:
    return errors.UNKNOWN_JOB("no such job")


def submit(gateway: Gateway, request: ProxyRequest, envelope: RequestEnvelope) -> Answer:
    """Record the job, publish it (confirmed), answer 202 with its location; with
    ``Prefer: wait=<s>``, the answer itself if it is ready within that time.

    The job id is made here and answered here, and goes nowhere else (``proxymq.jobs``).
    With an ``Idempotency-Key`` the job is submitted once: a repeat gets the same job.
    (``request.read`` refused the job already when this gateway has no result store.)
    """
    once = None
    if request.idempotency_key is not None:
        once = idempotency.Once(gateway, envelope, request)
        record = once.begin(PUBLISH_TIMEOUT)
        if record is not None:
            return once.replayed(replay(gateway, record, request))
    try:
        job_id = _publish(gateway, envelope, request.correlation_id, owner_hash(request.credential))
    except BaseException:
        if once is not None:
            once.release()
        raise
    if once is not None:
        once.keep_job(job_id)
    return _accepted(gateway, job_id, request.correlation_id, request)


def _publish(gateway: Gateway, envelope, correlation_id: str, owner: str) -> str:
    store = gateway.store
    job_id = new_job_id()
    wait = gateway.link.status.wait(envelope.service)  # the service's announced state
    eta_at = None if wait is None else time.time() + wait
    try:
        store.create(job_id, correlation_id, envelope.service, owner, envelope.deadline, eta_at)
    except redis.RedisError:
        raise errors.result_store_unavailable() from None
    try:
        publish(gateway.link, envelope, correlation_id, PUBLISH_TIMEOUT, reply_to=None)
    except (BrokerUnavailable, gevent.Timeout) as exc:
        _forget(store, job_id, correlation_id)
        raise errors.broker_unavailable(str(exc) or "no publisher confirm") from None
    except errors.GatewayError:  # unknown service, full queue
        _forget(store, job_id, correlation_id)
        raise
    metrics.jobs_total.labels(envelope.service, "submitted").inc()
    return job_id


def _accepted(gateway: Gateway, job_id: str, correlation_id: str, request: ProxyRequest) -> Answer:
    """202 with the job's location; first, up to ``Prefer: wait`` seconds for its answer."""
    if request.preferred_wait is not None:
        reply = _await(gateway.store, job_id, request.preferred_wait)
        if reply is not None:
            return reply_answer(reply, correlation_id, "GET")
        metrics.async_fallbacks_total.labels(request.label).inc()
    return job_accepted(job_id, correlation_id)


def _await(store: JobStore, job_id: str, wait: float):
    """The job's reply once it is done, polled for at most ``wait`` seconds; None when
    it is not done by then (or the store stopped answering: the job goes on)."""
    give_up = time.monotonic() + wait
    interval = 0.02
    while True:
        try:
            job = store.get(job_id)
        except redis.RedisError:
            return None
        if job is None:
            return None
        if job.status == DONE and job.reply is not None:
            return job.reply
        left = give_up - time.monotonic()
        if left <= 0:
            return None
        gevent.sleep(min(interval, left))
        interval = min(interval * 1.5, 0.25)


def replay(gateway: Gateway, record, request: ProxyRequest) -> Answer:
    """A repeat's answer (``Idempotency-Key``): the first one's stored answer, or the
    same job it submitted (waited for as ``Prefer: wait`` asks, when the repeat asks for
    a job); ``Once.replayed`` marks it."""
    if record.reply is not None:
        return reply_answer(record.reply, record.correlation_id, request.method)
    return _accepted(gateway, record.job_id, record.correlation_id, request)


def poll(
    store: JobStore | None,
    job_id: str,
    credential: str | None,
    states: ServiceStates | None = None,
) -> Answer:
    """202 while pending (a queued job with its estimated start, ``eta_seconds``, when
    ``states`` tells one); then the answer exactly as the synchronous call would give it.

    A header about the job itself (its callback's state, say) is added to both answers
    here, from ``job``: ``reply_answer`` keeps the downstream's own X-ProxyMQ-* out."""
    job = _owned(store, job_id, credential)
    if job.status == DONE and job.reply is not None:
        answer = reply_answer(job.reply, job.correlation_id, "GET")
        if job.callback is not None:  # how its callback went (workers/callbacks.py)
            answer.headers.append(("X-ProxyMQ-Callback-State", job.callback))
        return answer
    if job.expired:
        raise errors.TIMEOUT("the job did not finish before its deadline")
    headers = [("X-Correlation-ID", job.correlation_id)]
    body: dict = {"id": job_id, "status": job.status}
    if job.status == QUEUED and states is not None:
        eta = _eta(job, states)
        if eta is not None:
            body["eta_seconds"] = eta
    return json_answer(202, body, headers)


def _eta(job: Job, states: ServiceStates) -> float | None:
    """Seconds until a queued job starts: what was estimated when it was submitted, less
    the time since, and never more than the whole queue's wait now (the queue may drain
    faster than it did); None when neither is known."""
    now_wait = states.wait(job.service)
    left = None if job.eta_at is None else max(0.0, job.eta_at - time.time())
    known = [w for w in (left, now_wait) if w is not None]
    return round(min(known), 1) if known else None


def delete(store: JobStore | None, job_id: str, credential: str | None) -> Answer:
    """Cancel a queued job (the worker will skip it) or forget a finished one."""
    job = _owned(store, job_id, credential)
    if job.status == DONE:
        _forget(store, job_id, job.correlation_id)
        metrics.jobs_total.labels(job.service, "forgotten").inc()
        return Answer(204)
    try:
        cancelled = store.cancel(job) == QUEUED
    except redis.RedisError:
        raise errors.result_store_unavailable() from None
    if not cancelled:
        raise errors.JOB_RUNNING("the job is already running")
    metrics.jobs_total.labels(job.service, CANCELLED).inc()
    return Answer(204)


def _owned(store: JobStore | None, job_id: str, credential: str | None) -> Job:
    if store is None:
        raise unknown_job()
    try:
        job = store.get(job_id)
    except redis.RedisError:
        raise errors.result_store_unavailable() from None
    if job is None or not job.owned_by(credential):
        raise unknown_job()
    return job


def _forget(store: JobStore, job_id: str, correlation_id: str) -> None:
    try:
        store.forget(job_id, correlation_id)
    except redis.RedisError:
        raise errors.result_store_unavailable() from None

"""Asynchronous jobs on the gateway: 202 now, the answer later from ``/jobs/<id>``.

A request with ``Prefer: respond-async`` is published like any other, but persistent,
without a reply queue, and with ``PROXYMQ_JOB_TIMEOUT`` as its deadline; the worker puts
the answer into the result store (``proxymq.jobs``), where any gateway process or replica
finds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import gevent
import redis

from gateway import errors, incoming, metrics
from gateway.answers import Answer, json_answer, reply_answer
from gateway.broker import BrokerUnavailable
from gateway.outgoing import envelope_of, publish
from proxymq.jobs import CANCELLED, DONE, QUEUED, Job, JobStore, new_job_id, owner_hash

if TYPE_CHECKING:
    from gateway.proxy import Gateway

PUBLISH_TIMEOUT = 10.0


def callback_url(headers: incoming.Headers) -> str | None:
    url = incoming.header(headers, incoming.CALLBACK_HEADER)
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.bad_request(f"{incoming.CALLBACK_HEADER} must be an http or https URL")
    return url


def store_unavailable() -> errors.GatewayError:
    return errors.GatewayError(
        503, "result-store-unavailable", "the result store cannot be reached", 5
    )


def unknown_job() -> errors.GatewayError:
    return errors.GatewayError(404, "unknown-job", "no such job")


def submit(gateway: Gateway, request: incoming.ClientRequest, correlation_id: str) -> Answer:
    """Record the job, publish it (confirmed), answer 202 with its location.

    The job id is made here and answered here, and goes nowhere else (``proxymq.jobs``).
    """
    store, config = gateway.store, gateway.config
    if store is None:
        raise errors.GatewayError(
            501, "async-unavailable", "asynchronous jobs need PROXYMQ_RESULT_URL on the gateway"
        )
    callback = callback_url(request.headers)
    envelope = envelope_of(request, config.job_timeout, config, job=True, callback=callback)
    owner = owner_hash(incoming.header(request.headers, config.job_auth_header))
    job_id = new_job_id()
    try:
        store.create(job_id, correlation_id, envelope.service, owner, envelope.deadline)
    except redis.RedisError:
        raise store_unavailable() from None
    try:
        publish(gateway.link, envelope, correlation_id, PUBLISH_TIMEOUT, reply_to=None)
    except (BrokerUnavailable, gevent.Timeout) as exc:
        _forget(store, job_id, correlation_id)
        raise errors.broker_unavailable(str(exc) or "no publisher confirm") from None
    except errors.GatewayError:  # unknown service, full queue
        _forget(store, job_id, correlation_id)
        raise
    metrics.jobs_total.labels(envelope.service, "submitted").inc()
    location = f"/jobs/{job_id}"
    return json_answer(
        202,
        {"id": job_id, "status": QUEUED, "location": location},
        [("Location", location), ("X-Correlation-ID", correlation_id)],
    )


def poll(store: JobStore | None, job_id: str, credential: str | None) -> Answer:
    """202 while pending; then the answer exactly as the synchronous call would give it."""
    job = _owned(store, job_id, credential)
    if job.status == DONE and job.reply is not None:
        return reply_answer(job.reply, job.correlation_id, "GET")
    if job.expired:
        raise errors.GatewayError(504, "timeout", "the job did not finish before its deadline")
    headers = [("X-Correlation-ID", job.correlation_id)]
    return json_answer(202, {"id": job_id, "status": job.status}, headers)


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
        raise store_unavailable() from None
    if not cancelled:
        raise errors.GatewayError(409, "job-running", "the job is already running")
    metrics.jobs_total.labels(job.service, CANCELLED).inc()
    return Answer(204)


def _owned(store: JobStore | None, job_id: str, credential: str | None) -> Job:
    if store is None:
        raise unknown_job()
    try:
        job = store.get(job_id)
    except redis.RedisError:
        raise store_unavailable() from None
    if job is None or not job.owned_by(credential):
        raise unknown_job()
    return job


def _forget(store: JobStore, job_id: str, correlation_id: str) -> None:
    try:
        store.forget(job_id, correlation_id)
    except redis.RedisError:
        raise store_unavailable() from None

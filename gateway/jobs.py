"""Asynchronous jobs on the gateway: 202 now, the answer later from ``/jobs/<id>``.

A request with ``Prefer: respond-async`` is published like any other, but persistent,
without a reply queue, and with ``PROXYMQ_JOB_TIMEOUT`` as its deadline; the worker puts
the answer into the result store (``proxymq.jobs``), where any gateway process or replica
finds it.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import gevent
import redis

from gateway import controls, errors, idempotency, incoming, metrics
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


def submit(
    gateway: Gateway,
    request: incoming.ClientRequest,
    correlation_id: str,
    key: str | None = None,
) -> Answer:
    """Record the job, publish it (confirmed), answer 202 with its location; with
    ``Prefer: wait=<s>``, the answer itself if it is ready within that time.

    The job id is made here and answered here, and goes nowhere else (``proxymq.jobs``).
    With an ``Idempotency-Key`` the job is submitted once: a repeat gets the same job.
    """
    store, config = gateway.store, gateway.config
    if store is None:
        raise errors.GatewayError(
            501, "async-unavailable", "asynchronous jobs need PROXYMQ_RESULT_URL on the gateway"
        )
    callback = callback_url(request.headers)
    envelope = envelope_of(request, config.job_timeout, config, job=True, callback=callback)
    credential = incoming.header(request.headers, config.job_auth_header)
    wait = controls.preferred_wait(request.headers, config.reply_timeout)
    once = None
    if key is not None:
        label = functools.partial(metrics.label, request.service, config, gateway.link.known_queues)
        once = idempotency.Once(gateway, envelope, key, request.headers, correlation_id, label)
        record = once.begin(PUBLISH_TIMEOUT)
        if record is not None:
            return once.replayed(replay(gateway, record, request))
    try:
        job_id = _publish(gateway, envelope, correlation_id, owner_hash(credential))
    except BaseException:
        if once is not None:
            once.release()
        raise
    if once is not None:
        once.keep_job(job_id)
    return _accepted(gateway, job_id, correlation_id, request.service, wait)


def _publish(gateway: Gateway, envelope, correlation_id: str, owner: str) -> str:
    store = gateway.store
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
    return job_id


def _accepted(
    gateway: Gateway, job_id: str, correlation_id: str, service: str, wait: float | None
) -> Answer:
    """202 with the job's location; first, up to ``wait`` seconds for its answer."""
    if wait is not None:
        reply = _await(gateway.store, job_id, wait)
        if reply is not None:
            return reply_answer(reply, correlation_id, "GET")
        label = metrics.label(service, gateway.config, gateway.link.known_queues)
        metrics.async_fallbacks_total.labels(label).inc()
    location = f"/jobs/{job_id}"
    return json_answer(
        202,
        {"id": job_id, "status": QUEUED, "location": location},
        [
            ("Location", location),
            ("X-Correlation-ID", correlation_id),
            ("Preference-Applied", "respond-async"),
        ],
    )


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


def replay(gateway: Gateway, record, request: incoming.ClientRequest) -> Answer:
    """A repeat's answer (``Idempotency-Key``): the first one's stored answer, or the
    same job it submitted (waited for as ``Prefer: wait`` asks); ``Once.replayed``
    marks it."""
    if record.reply is not None:
        answer = reply_answer(record.reply, record.correlation_id, request.method)
    else:
        wait = None
        if incoming.wants_async(request.headers):
            wait = controls.preferred_wait(request.headers, gateway.config.reply_timeout)
        cid, service = record.correlation_id, request.service
        answer = _accepted(gateway, record.job_id, cid, service, wait)
    return answer


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

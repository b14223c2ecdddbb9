"""Asynchronous jobs: their state in Redis, shared by every gateway process and worker.

A job is one request sent with ``Prefer: respond-async``. The gateway creates the record
and publishes the request as usual; the worker marks it running, then stores the reply;
any gateway process or replica answers polls from Redis.

The job id is a secret of its own (``new_job_id``), not the request's correlation id: the
correlation id travels in the message, reaches the downstream, Celery's task events,
Flower and logs, so whoever sees any of those could read or cancel the job if it were
the id. The job id is only ever in the 202 answer; Redis holds its SHA-256, which
leads to the record (``proxymq:job-id:<sha256>`` -> correlation id), and the worker,
which never learns the id, finds the record by the correlation id. One hash per job,
``proxymq:job:<correlation id>``:

    status    queued | running | done | cancelled
    owner     sha256 of the submitter's auth header value ("" when it sent none)
    service   the service name
    deadline  epoch ms after which nobody will work on it any more
    reply     the stored reply envelope (msgpack), once done
    callback  delivered | retrying | failed: how its callback went, once tried
              (``workers.callbacks``); absent without a callback or before its first try

State changes that race (a cancel against a worker starting) are Lua scripts, so each
is atomic in Redis. Records expire: ``job_ttl`` after they finish, and at their deadline
plus ``job_ttl`` while pending.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import redis

from proxymq.envelope import ReplyEnvelope, decode_reply, encode_reply

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"
DELIVERED, RETRYING, FAILED = "delivered", "retrying", "failed"  # a job's callback

# queued/running -> running (a redelivered job may run again); anything else: refuse.
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'running')
  return 1
end
return 0
"""
# queued -> cancelled; returns the status found.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled')
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return status
"""
# The callback's state, on a record that still exists (an expired one is not made again).
_CALLBACK = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'callback', ARGV[1])
end
"""
# running/queued -> done with the reply, returning its owner; a cancelled or forgotten
# job stays so (nil).
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'done', 'reply', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return redis.call('HGET', KEYS[1], 'owner') or ''
end
return false
"""


def new_job_id() -> str:
    """192 random bits, URL-safe: unguessable, and nothing else is derived from it."""
    return secrets.token_urlsafe(24)


def owner_hash(credential: str | None) -> str:
    """What binds a job to its submitter: a hash, so Redis never holds the secret."""
    return hashlib.sha256(credential.encode()).hexdigest() if credential else ""


@dataclass(frozen=True, slots=True)
class Job:
    correlation_id: str
    status: str
    owner: str
    service: str
    deadline: int
    reply: ReplyEnvelope | None
    eta_at: float | None = None  # epoch seconds its start was estimated for, at submission
    callback: str | None = None  # DELIVERED, RETRYING, FAILED, or None

    def owned_by(self, credential: str | None) -> bool:
        return hmac.compare_digest(self.owner, owner_hash(credential))

    @property
    def expired(self) -> bool:
        return self.status in (QUEUED, RUNNING) and self.deadline <= time.time() * 1000


class JobStore:
    def __init__(self, url: str, ttl: int) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._ttl = ttl
        self._start = self._redis.register_script(_START)
        self._cancel = self._redis.register_script(_CANCEL)
        self._finish = self._redis.register_script(_FINISH)
        self._callback = self._redis.register_script(_CALLBACK)

    @staticmethod
    def key(correlation_id: str) -> str:
        return f"proxymq:job:{correlation_id}"

    @staticmethod
    def id_key(job_id: str) -> str:
        return "proxymq:job-id:" + hashlib.sha256(job_id.encode()).hexdigest()

    def create(
        self,
        job_id: str,
        correlation_id: str,
        service: str,
        owner: str,
        deadline: int,
        eta_at: float | None = None,
    ) -> None:
        """The record and the id leading to it, both kept until the deadline plus the TTL
        (a finished record then expires sooner, ``job_ttl`` after it finished).
        ``eta_at``: when the job is expected to start (the gateway's estimate)."""
        key, id_key = self.key(correlation_id), self.id_key(job_id)
        fields = {"status": QUEUED, "owner": owner, "service": service, "deadline": deadline}
        if eta_at is not None:
            fields["eta_at"] = f"{eta_at:.3f}"
        pending_for = max(1, int(deadline / 1000 - time.time())) + self._ttl
        with self._redis.pipeline() as pipe:
            pipe.hset(key, mapping=fields).expire(key, pending_for)
            pipe.set(id_key, correlation_id, ex=pending_for).execute()

    def get(self, job_id: str) -> Job | None:
        correlation_id = self._redis.get(self.id_key(job_id))
        if correlation_id is None:
            return None
        correlation_id = correlation_id.decode()
        fields = self._redis.hgetall(self.key(correlation_id))
        if not fields or fields.get(b"status", b"").decode() == CANCELLED:
            return None
        reply = fields.get(b"reply")
        return Job(
            correlation_id=correlation_id,
            status=fields[b"status"].decode(),
            owner=fields.get(b"owner", b"").decode(),
            service=fields.get(b"service", b"").decode(),
            deadline=int(fields.get(b"deadline", b"0")),
            reply=decode_reply(reply) if reply else None,
            eta_at=float(fields[b"eta_at"]) if b"eta_at" in fields else None,
            callback=fields[b"callback"].decode() if b"callback" in fields else None,
        )

    # The worker's side, by correlation id (the worker never knows the job id).

    def start(self, correlation_id: str) -> bool:
        """Mark the job running; False when it was cancelled, finished or forgotten."""
        return bool(self._start(keys=[self.key(correlation_id)]))

    def finish(self, correlation_id: str, reply: ReplyEnvelope) -> str | None:
        """Store the reply; the job's owner ("" anonymous: its callback's submitter), or
        None when the job was cancelled or forgotten meanwhile."""
        args = [encode_reply(reply), self._ttl]
        owner = self._finish(keys=[self.key(correlation_id)], args=args)
        return None if owner is None else owner.decode()

    def unsent_callback(self, correlation_id: str) -> tuple[ReplyEnvelope, str] | None:
        """The stored reply and the owner of a finished job whose callback has not been
        tried yet."""
        fields = ("status", "reply", "callback", "owner")
        status, reply, callback, owner = self._redis.hmget(self.key(correlation_id), *fields)
        if status != DONE.encode() or reply is None or callback is not None:
            return None
        return decode_reply(reply), (owner or b"").decode()

    def callback_state(self, correlation_id: str, state: str) -> None:
        """Record how the job's callback went (DELIVERED, RETRYING, FAILED)."""
        self._callback(keys=[self.key(correlation_id)], args=[state])

    # The gateway's side, for a job it found with ``get``.

    def cancel(self, job: Job) -> str | None:
        """Cancel a queued job; return the status it had (None when there was none)."""
        status = self._cancel(keys=[self.key(job.correlation_id)], args=[self._ttl])
        return status.decode() if status else None

    def forget(self, job_id: str, correlation_id: str) -> None:
        self._redis.delete(self.id_key(job_id), self.key(correlation_id))

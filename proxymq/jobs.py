"""Asynchronous jobs: their state in Redis, shared by every gateway process and worker.

A job is one request sent with ``Prefer: respond-async``. Its id is the request's
correlation id. The gateway creates the record and publishes the request as usual; the
worker marks it running, then stores the reply; any gateway process or replica answers
polls from Redis. One hash per job, ``proxymq:job:<id>``:

    status    queued | running | done | cancelled
    owner     sha256 of the submitter's auth header value ("" when it sent none)
    service   the service name
    deadline  epoch ms after which nobody will work on it any more
    reply     the stored reply envelope (msgpack), once done

State changes that race (a cancel against a worker starting) are Lua scripts, so each
is atomic in Redis. Records expire: ``job_ttl`` after they finish, and at their deadline
plus ``job_ttl`` while pending.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

import redis

from proxymq.envelope import ReplyEnvelope, decode_reply, encode_reply

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"

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
# running/queued -> done with the reply; a cancelled or forgotten job stays so.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'done', 'reply', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def owner_hash(credential: str | None) -> str:
    """What binds a job to its submitter: a hash, so Redis never holds the secret."""
    return hashlib.sha256(credential.encode()).hexdigest() if credential else ""


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    status: str
    owner: str
    service: str
    deadline: int
    reply: ReplyEnvelope | None

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

    @staticmethod
    def key(job_id: str) -> str:
        return f"proxymq:job:{job_id}"

    def create(self, job_id: str, service: str, owner: str, deadline: int) -> None:
        key = self.key(job_id)
        fields = {"status": QUEUED, "owner": owner, "service": service, "deadline": deadline}
        pending_for = max(1, int(deadline / 1000 - time.time())) + self._ttl
        with self._redis.pipeline() as pipe:
            pipe.hset(key, mapping=fields).expire(key, pending_for).execute()

    def get(self, job_id: str) -> Job | None:
        fields = self._redis.hgetall(self.key(job_id))
        if not fields or fields.get(b"status", b"").decode() == CANCELLED:
            return None
        reply = fields.get(b"reply")
        return Job(
            id=job_id,
            status=fields[b"status"].decode(),
            owner=fields.get(b"owner", b"").decode(),
            service=fields.get(b"service", b"").decode(),
            deadline=int(fields.get(b"deadline", b"0")),
            reply=decode_reply(reply) if reply else None,
        )

    def start(self, job_id: str) -> bool:
        """Mark the job running; False when it was cancelled, finished or forgotten."""
        return bool(self._start(keys=[self.key(job_id)]))

    def finish(self, job_id: str, reply: ReplyEnvelope) -> bool:
        return bool(self._finish(keys=[self.key(job_id)], args=[encode_reply(reply), self._ttl]))

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued job; return the status it had (None when there was none)."""
        status = self._cancel(keys=[self.key(job_id)], args=[self._ttl])
        return status.decode() if status else None

    def forget(self, job_id: str) -> None:
        self._redis.delete(self.key(job_id))

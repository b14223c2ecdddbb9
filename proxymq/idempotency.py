"""Idempotency keys: one record per (submitter, key) in the result store (Redis).

``Idempotency-Key`` (IETF httpapi draft): the first request with a key claims it and is
sent on as usual; a repeat with the same key from the same submitter gets the first one's
answer without a second downstream call, or waits for it while it runs. The submitter
is its credentials (``scope``): the credential header and the cookies, hashed; a
request with neither is ``anonymous``. One hash per claim,
``proxymq:idem:<sha256 of scope and key>``:

    state   running | done
    fp      sha256 of the request (method, service, path, query, body): a key reused for
            another request is refused (422), never answered with the other's answer
    cid     the first request's correlation id (only its own caller may finish or
            release the claim)
    reply   the stored reply envelope (msgpack), once done (a synchronous request)
    job     the job id, masked (a job: its replay is the same 202)

A running claim is a lease: it expires on its own (the wait of the first request plus a
margin; a stream renews it while it runs) so a gateway that dies holding it blocks the
key only until then. A done record
expires ``PROXYMQ_IDEMPOTENCY_TTL`` after it was stored. Neither the key nor the
submitter's credential is stored: the Redis key is a hash of both; the job id, a secret,
is stored masked with a pad only the key and the credential give.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import redis

from proxymq.envelope import ReplyEnvelope, RequestEnvelope, decode_reply, encode_reply

RUNNING, DONE = "running", "done"
# The scope of a request that presented no credential at all: shared by all such requests.
ANONYMOUS = "anonymous"

# Claim a free key: the record, with the lease as its expiry. 1 claimed, 0 taken.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'running', 'fp', ARGV[1], 'cid', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# The claimer's answer: done, kept for the TTL. Only the claim's own request may.
_FINISH = """
if redis.call('HGET', KEYS[1], 'cid') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'done', ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
# The claimer's call still runs (a stream): its lease starts again. 1 renewed, 0 not its.
_RENEW = """
if redis.call('HGET', KEYS[1], 'cid') ~= ARGV[1] or
   redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 0
end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
# The claimer gives up (no answer to keep): the next repeat claims the key again.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'cid') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def scope(credential: str | None, cookie: str | None) -> str:
    """Whose key it is: the credential header's value and the ``Cookie`` header's (a
    session cookie is a credential too), hashed; ``ANONYMOUS`` with neither. A key is
    only ever replayed within its scope, so to a client that presented the same ones.
    A header sent empty (or blank) names nobody: it counts as not sent, else every
    client sending ``Authorization:`` empty would share a scope that is not anonymous
    (its replays with their ``Set-Cookie``, its jobs' ids)."""
    credential = credential if credential and credential.strip() else None
    cookie = cookie if cookie and cookie.strip() else None
    if credential is None and cookie is None:
        return ANONYMOUS
    if cookie is None:  # as before cookies counted: records of a credential stay its own
        return hashlib.sha256(credential.encode("utf-8", "surrogateescape")).hexdigest()
    digest = hashlib.sha256(b"proxymq-idempotency-scope\x00")
    for value in (credential, cookie):
        digest.update(b"\x00" if value is None else b"=" + value.encode("utf-8", "surrogateescape"))
        digest.update(b"\x00")
    return digest.hexdigest()


def fingerprint(envelope: RequestEnvelope) -> str:
    """What makes two requests "the same" for a key: method, service, path, query, body.
    Headers are not in it (a retry may carry another ``traceparent`` or date)."""
    digest = hashlib.sha256()
    query = "\x00" if envelope.query is None else "?" + envelope.query
    for part in (envelope.method, envelope.service, envelope.path, query):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\x00")
    digest.update(envelope.body)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Claim:
    """Who asks: the record's Redis key and the pad that masks a job id, both derived
    from the submitter's hash and the key; ``fp`` is the request's fingerprint."""

    key: str
    pad: bytes
    fp: str

    @classmethod
    def of(cls, scope: str, idempotency_key: str, fp: str) -> Claim:
        secret = scope.encode() + b"\x00" + idempotency_key.encode("utf-8", "surrogateescape")
        name = hashlib.sha256(b"proxymq-idempotency\x00" + secret).hexdigest()
        pad = hashlib.sha512(b"proxymq-idempotency-job\x00" + secret).digest()
        return cls(f"proxymq:idem:{name}", pad, fp)

    def mask(self, job_id: str) -> str:
        data = job_id.encode()
        if len(data) > len(self.pad):
            raise ValueError("job id too long to mask")
        return bytes(a ^ b for a, b in zip(data, self.pad, strict=False)).hex()

    def unmask(self, masked: str) -> str:
        data = bytes.fromhex(masked)
        return bytes(a ^ b for a, b in zip(data, self.pad, strict=False)).decode(errors="replace")


@dataclass(frozen=True, slots=True)
class Record:
    state: str
    fp: str
    correlation_id: str
    reply: ReplyEnvelope | None
    job_id: str | None


class IdempotencyStore:
    def __init__(self, url: str, ttl: int) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._ttl = ttl
        self._claim = self._redis.register_script(_CLAIM)
        self._finish = self._redis.register_script(_FINISH)
        self._release = self._redis.register_script(_RELEASE)
        self._renew = self._redis.register_script(_RENEW)

    def claim(self, claim: Claim, correlation_id: str, lease: float) -> bool:
        """Take the key for this request for ``lease`` seconds; False when it is taken."""
        args = [claim.fp, correlation_id, max(1, int(lease * 1000))]
        return bool(self._claim(keys=[claim.key], args=args))

    def renew(self, claim: Claim, correlation_id: str, lease: float) -> bool:
        """Give this request's running claim ``lease`` more seconds; False when the
        claim is no longer its own (done, released, or expired and taken)."""
        args = [correlation_id, max(1, int(lease * 1000))]
        return bool(self._renew(keys=[claim.key], args=args))

    def get(self, claim: Claim) -> Record | None:
        fields = self._redis.hgetall(claim.key)
        if not fields or b"state" not in fields:
            return None
        reply, job = fields.get(b"reply"), fields.get(b"job")
        return Record(
            state=fields[b"state"].decode(),
            fp=fields.get(b"fp", b"").decode(),
            correlation_id=fields.get(b"cid", b"").decode(),
            reply=decode_reply(reply) if reply else None,
            job_id=claim.unmask(job.decode()) if job else None,
        )

    def finish(self, claim: Claim, correlation_id: str, reply: ReplyEnvelope) -> bool:
        args = [correlation_id, "reply", encode_reply(reply), self._ttl]
        return bool(self._finish(keys=[claim.key], args=args))

    def finish_job(self, claim: Claim, correlation_id: str, job_id: str) -> bool:
        args = [correlation_id, "job", claim.mask(job_id), self._ttl]
        return bool(self._finish(keys=[claim.key], args=args))

    def release(self, claim: Claim, correlation_id: str) -> None:
        self._release(keys=[claim.key], args=[correlation_id])

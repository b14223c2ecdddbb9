"""``Idempotency-Key`` on the gateway: claim the key, or wait for its claimer, or replay.

The first request with a key claims it (``proxymq.idempotency``) and goes on as any
other; when it gets the downstream's answer it stores it under the key, and the claim is
done. A repeat (same submitter, same key) finds the claim: with another fingerprint it
is refused with 422 ``idempotency-key-reused``; done, it gets the stored answer with
``Idempotent-Replayed: true``; still running, it polls the record until it is done (or
released: then it claims the key itself), at most its own wait. The result store out
of reach is 503 ``result-store-unavailable`` before anything is published: never a call
that a later repeat could not see.

Only the downstream's answers are kept. The gateway's own errors (timeout, broker or
queue unavailable, the worker's 502s) release the key, so the client's retry is sent
again; a streamed answer holds the key until its stream ends, then releases it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent
import redis

from gateway import errors, metrics
from gateway.answers import Answer
from gateway.controls import REPLAYED_HEADER
from proxymq.envelope import ReplyEnvelope, RequestEnvelope
from proxymq.idempotency import DONE, Claim, IdempotencyStore, Record, fingerprint
from proxymq.jobs import owner_hash

if TYPE_CHECKING:
    from gateway.proxy import Gateway

log = logging.getLogger(__name__)

# A claim outlives its request's own wait by this much: the worker ends the downstream
# call at the request's deadline, so after it nobody can still be calling for it.
LEASE_MARGIN = 10.0
_POLL_FIRST, _POLL_MAX = 0.02, 0.25


def reused() -> errors.GatewayError:
    return errors.GatewayError(
        422,
        "idempotency-key-reused",
        "this Idempotency-Key was used for a different request (method, path or body)",
    )


def unavailable() -> errors.GatewayError:
    return errors.GatewayError(
        501,
        "idempotency-unavailable",
        "Idempotency-Key needs PROXYMQ_RESULT_URL on the gateway",
    )


def store_unavailable() -> errors.GatewayError:
    return errors.GatewayError(
        503, "result-store-unavailable", "the result store cannot be reached", 5
    )


def replayed(answer: Answer) -> Answer:
    answer.headers.append((REPLAYED_HEADER, "true"))
    return answer


class Once:
    """One request's hold on its key: ``begin``, then ``keep_*`` or ``release``."""

    def __init__(
        self,
        gateway: Gateway,
        envelope: RequestEnvelope,
        key: str,
        credential: str | None,
        correlation_id: str,
        label: Callable[[], str],
    ) -> None:
        if gateway.idempotency is None:
            raise unavailable()
        self._store: IdempotencyStore = gateway.idempotency
        self._claim = Claim.of(owner_hash(credential), key, fingerprint(envelope))
        self._correlation_id = correlation_id
        self._label = label
        self.held = False

    def begin(self, lease: float) -> Record | None:
        """None: the key is this request's now (for ``lease`` seconds), go on. Else the
        finished first request's record, to replay. Waits while the first one runs, at
        most ``lease`` seconds (504 beyond)."""
        give_up = time.monotonic() + lease
        interval, waited = _POLL_FIRST, False
        while True:
            try:
                if self._store.claim(self._claim, self._correlation_id, lease + LEASE_MARGIN):
                    self.held = True
                    return None
                record = self._store.get(self._claim)
            except redis.RedisError:
                raise store_unavailable() from None
            if record is not None and record.fp != self._claim.fp:
                raise reused()
            if record is not None and record.state == DONE:
                metrics.idempotent_replays_total.labels(self._label()).inc()
                return record
            if record is None:
                pass  # released or expired just now: claim it after the pause
            elif not waited:
                waited = True
                metrics.idempotent_waits_total.labels(self._label()).inc()
            if time.monotonic() >= give_up:
                raise errors.timeout(lease)
            gevent.sleep(interval)
            interval = min(interval * 1.5, _POLL_MAX)

    def keep_reply(self, reply: ReplyEnvelope) -> None:
        """The first answer: kept when it is the downstream's, else the key is let go."""
        if reply.error is not None:
            self.release()
            return
        self._settle(lambda: self._store.finish(self._claim, self._correlation_id, reply))

    def keep_job(self, job_id: str) -> None:
        self._settle(lambda: self._store.finish_job(self._claim, self._correlation_id, job_id))

    def release(self) -> None:
        self._settle(lambda: self._store.release(self._claim, self._correlation_id))

    def _settle(self, step: Callable[[], object]) -> None:
        """Its answer goes to its client whatever happens here: a store that failed just
        now leaves the claim to expire with its lease (a later repeat then runs again)."""
        if not self.held:
            return
        self.held = False
        try:
            step()
        except redis.RedisError as exc:
            log.warning("could not settle an idempotency key: %r", exc)

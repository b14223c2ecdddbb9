"""``Idempotency-Key`` on the gateway: claim the key, or wait for its claimer, or replay.

The first request with a key claims it (``proxymq.idempotency``) and goes on as any
other; when it gets the downstream's answer it stores it under the key, and the claim is
done. A repeat (same credentials, same key: ``proxymq.idempotency.scope``; a client
without any shares the anonymous scope, whose replays never carry ``Set-Cookie`` nor
a job's id: 409 ``anonymous-job-replay``) finds the claim: with another fingerprint it
is refused with 422 ``idempotency-key-reused``; done, it gets the stored answer with
``Idempotent-Replayed: true``; still running, it polls the record until it is done (or
released: then it claims the key itself), at most its own wait. The result store out
of reach is 503 ``result-store-unavailable`` before anything is published: never a call
that a later repeat could not see.

Only the downstream's answers are kept. The gateway's own errors (broker or queue
unavailable, the worker's 502s) release the key, so the client's retry is sent again.
Two never free it while the first call may still run: a timeout keeps the claim until
the worker's late reply (kept, or the key released if it is an error) or the lease's
end; a streamed answer renews its claim while it runs and releases it at its end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent
import redis
from gevent.event import Event

from gateway import errors, metrics
from gateway.answers import Answer, replayed
from gateway.streams import OPEN, Stream
from proxymq.envelope import ReplyEnvelope, RequestEnvelope, decode_reply
from proxymq.idempotency import (
    ANONYMOUS,
    DONE,
    Claim,
    IdempotencyStore,
    Record,
    fingerprint,
    scope,
)

if TYPE_CHECKING:
    from gateway.process import Gateway
    from gateway.replies import ReplyRouter
    from gateway.request import ProxyRequest

log = logging.getLogger(__name__)

# A claim outlives its request's own wait by this much: the worker ends the downstream
# call at the request's deadline (a stream excepted: it renews its claim), so after it
# nobody can still be calling for it; the margin covers the clocks' skew.
LEASE_MARGIN = 10.0
_POLL_FIRST, _POLL_MAX = 0.02, 0.25


class Once:
    """One request's hold on its key: ``begin``; then ``keep_reply`` or ``keep_job``
    (its answer), ``keep_alive`` until ``release`` (a stream), or ``fail``.

    A synchronous call holds it as a context manager (``with Once(...) as once``): the
    block sets ``outcome`` and leaving it settles the key, so the call's path goes into
    the key once, and out, and the error path needs no handler of its own."""

    def __init__(self, gateway: Gateway, envelope: RequestEnvelope, request: ProxyRequest) -> None:
        """A hold on ``request``'s key; none (every step a no-op) for a request without
        one. 501 when this gateway has no result store."""
        self.held = self.anonymous = False
        self.record: Record | None = None  # what a repeat replays (``begin``)
        # What the ``with`` block got (``exchange``'s reply and stream): what is kept.
        self.outcome: tuple[ReplyEnvelope, Stream | None] | None = None
        self._request = request  # its wait, and its metric label when a repeat is counted
        self._replies = gateway.link.replies
        self._lease = self._expires = 0.0
        if request.idempotency_key is None:
            return  # every synchronous call makes one: nothing more for most of them
        self._settled = Event()
        if gateway.idempotency is None:
            raise errors.IDEMPOTENCY_UNAVAILABLE(
                "Idempotency-Key needs PROXYMQ_RESULT_URL on the gateway"
            )
        self._store: IdempotencyStore = gateway.idempotency
        self._correlation_id = request.correlation_id
        self._scope = scope(request.credential, request.cookie)
        self.anonymous = self._scope == ANONYMOUS
        self._claim = Claim.of(self._scope, request.idempotency_key, fingerprint(envelope))

    def __enter__(self) -> Once:
        """A synchronous call's hold: ``record`` is set when the call is a repeat to
        replay; else the call goes on and sets ``outcome``, which the key keeps."""
        if self._request.idempotency_key is not None:
            self.record = self.begin(self._request.wait)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Settle the key as the block ended: its reply kept, a stream's claim renewed
        while it runs (``release`` at its end), an error let go or, for a timeout, held
        for the late reply (``fail``)."""
        if error is not None:
            self.fail(error, self._replies)
        elif self.outcome is not None:
            reply, stream = self.outcome
            if stream is None:
                self.keep_reply(reply)
            else:
                self.keep_alive(lambda: stream.state == OPEN)

    def begin(self, wait: float) -> Record | None:
        """None: the key is this request's now (for ``wait`` + ``LEASE_MARGIN`` seconds),
        go on. Else the finished first request's record, to replay. Waits while the
        first one runs, at most ``wait`` seconds (504 beyond)."""
        lease = wait + LEASE_MARGIN
        give_up = time.monotonic() + wait
        interval, waited = _POLL_FIRST, False
        while True:
            try:
                if self._store.claim(self._claim, self._correlation_id, lease):
                    self.held = True
                    self._lease, self._expires = lease, time.monotonic() + lease
                    return None
                record = self._store.get(self._claim)
            except redis.RedisError:
                raise errors.result_store_unavailable() from None
            if record is not None and record.fp != self._claim.fp:
                raise errors.IDEMPOTENCY_KEY_REUSED(
                    "this Idempotency-Key was used for a different request (method, path or body)"
                )
            if record is not None and record.state == DONE:
                self._check_replayable(record)
                metrics.idempotent_replays_total.labels(self._request.label).inc()
                return record
            if record is None:
                pass  # released or expired just now: claim it after the pause
            elif not waited:
                waited = True
                metrics.idempotent_waits_total.labels(self._request.label).inc()
            if time.monotonic() >= give_up:
                raise errors.timeout(wait)
            gevent.sleep(interval)
            interval = min(interval * 1.5, _POLL_MAX)

    def _check_replayable(self, record: Record) -> None:
        """A job's replay is its id, and an anonymous job is read by whoever holds its
        id: in the anonymous scope, which every client without a credential shares, the
        id would go to anyone who sends the key. So such a repeat is refused (409),
        whatever it asks for (the 202, the answer with ``Prefer: wait``, or no job)."""
        if record.job_id is not None and self._scope == ANONYMOUS:
            raise errors.ANONYMOUS_JOB_REPLAY(
                "this Idempotency-Key submitted a job without a credential: its repeat without"
                " one is refused, as the job's id would reach whoever sends the key"
            )

    def replayed(self, answer: Answer) -> Answer:
        """A repeat's answer, marked as a replay (``answers.replayed``)."""
        return replayed(answer, self.anonymous)

    def keep_reply(self, reply: ReplyEnvelope) -> None:
        """The first answer: kept when it is the downstream's, else the key is let go."""
        if reply.error is not None:
            self.release()
            return
        self._settle(lambda: self._store.finish(self._claim, self._correlation_id, reply))

    def keep_job(self, job_id: str) -> None:
        self._settle(lambda: self._store.finish_job(self._claim, self._correlation_id, job_id))

    def keep_alive(self, running: Callable[[], bool]) -> None:
        """A stream is relayed, not kept, and may outlive the lease: its claim is renewed
        every third of the lease while ``running()`` (its downstream call goes on) and
        until ``release``, so a repeat waits for it to end instead of calling the
        downstream a second time. A stream that stopped but was never released (its
        client's answer lost) leaves the claim to expire with its lease."""
        if self.held:
            gevent.spawn(self._renew, running)

    def _renew(self, running: Callable[[], bool]) -> None:
        while not self._settled.wait(self._lease / 3) and running():
            try:
                if not self._store.renew(self._claim, self._correlation_id, self._lease):
                    return  # not this request's any more
            except redis.RedisError as exc:  # two thirds of the lease left to retry in
                log.warning("could not renew an idempotency key: %r", exc)

    def fail(self, error: BaseException, replies: ReplyRouter) -> None:
        """The request ends without an answer. After a timeout its call may still run
        (the worker ends it at the deadline, but only it knows when): the key stays
        claimed until the worker's late reply says the call is over (kept as
        ``keep_reply`` does, so a repeat gets the downstream's answer) or, without one,
        until the lease runs out. Any other error: the request was not sent, or its
        call was answered: the key is let go."""
        left = self._expires - time.monotonic()
        timed_out = isinstance(error, errors.GatewayError) and error.code == errors.TIMEOUT.code
        if timed_out and left > 0:
            if self.held:
                replies.expect_late(self._correlation_id, self._late, left)
            return
        self.release()

    def _late(self, body: bytes) -> None:
        try:
            reply = decode_reply(body)
        except ValueError:  # the worker answered, so the call is over: nothing to keep
            self.release()
            return
        self.keep_reply(reply)

    def release(self) -> None:
        self._settle(lambda: self._store.release(self._claim, self._correlation_id))

    def _settle(self, step: Callable[[], object]) -> None:
        """Its answer goes to its client whatever happens here: a store that failed just
        now leaves the claim to expire with its lease (a later repeat then runs again)."""
        if not self.held:
            return
        self.held = False
        self._settled.set()
        try:
            step()
        except redis.RedisError as exc:
            log.warning("could not settle an idempotency key: %r", exc)

"""A worker's one way through: delivery -> admission -> batch -> call -> answer -> ack.

Single and batch mode are the same path: a single request is a batch of one sent to the
plain downstream URL (``workers.batching`` decides what goes together). Threads:

- the **consumer thread** (Celery's event loop) owns the connection: it takes each
  message (``receive``), admits it, forms batches, publishes answers, requests published
  again and dead letters (``workers.publisher``), and acknowledges each message when the
  broker has confirmed what answered it;
- **call threads** (``-c`` of them) make the downstream calls and a job's result-store
  writes, then hand the outcome back (``Consumer.call_soon``). They take their work from
  a ``queue.SimpleQueue`` rather than through Celery's thread pool: its
  ``ThreadPoolExecutor`` builds a Future (a Condition and an RLock) for every call,
  which measured 8 % of a worker's CPU per request; nothing here waits on a Future.

Nothing in the consumer thread waits for the broker: publishing only writes
(``proxymq.confirms``), and confirms come back through the event loop's own reads.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from kombu.message import Message

from proxymq import tracing
from proxymq.config import QUEUE_SUFFIX, ServiceConfig
from proxymq.confirms import ACK, LOST, NACK, RETURNED
from proxymq.envelope import HEAD, ReplyEnvelope, StreamPart, encode_reply, recounted
from workers import answering, batch_call, forwarding, metrics, poison
from workers.admission import Verdict, admit
from workers.batching import Batcher
from workers.delivery import Delivery, Malformed, take
from workers.events import TaskEvents
from workers.publisher import Publisher, properties_of
from workers.runtime import Runtime
from workers.streaming import Streaming, Streams

log = logging.getLogger(__name__)

# What a call thread says of each delivery it handled.
PUBLISH = "publish"  # reply to the client's reply queue, ack once confirmed
ACKNOWLEDGE = "ack"  # answered elsewhere (a job), or a cancelled job: ack now
REQUEUE = "requeue"  # could not be answered: back to the queue
STREAMED = "streamed"  # relayed in parts, settled when its head was confirmed

Outcome = tuple[Delivery, ReplyEnvelope | None, str]


class Pipeline:
    def __init__(self, consumer, runtime: Runtime) -> None:
        """``consumer``: Celery's consumer (its timer, ``call_soon``, dispatcher)."""
        self._consumer = consumer
        self._runtime = runtime
        self.services = {s.queue: s for s in runtime.config.services.values()}
        self._batchers = {
            s.queue: Batcher(
                s,
                s.batch_concurrency if s.batch_url else runtime.concurrency,
                consumer.timer.call_after,
                functools.partial(self._start_call, s),
            )
            for s in self.services.values()
        }
        self.events = TaskEvents(consumer)
        self._publisher: Publisher | None = None
        self._streams = Streams()
        self._parts: deque[Callable[[], None]] = deque()
        self._cancel_queue = ""
        self._done: deque[tuple[ServiceConfig, list[Outcome], float]] = deque()
        self._taking = False
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        for number in range(runtime.concurrency):
            name = f"proxymq-call-{number}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    @property
    def prefetch(self) -> int:
        """Unacknowledged messages the batch services need beyond Celery's prefetch
        (``-c``): a full batch in each call, one being answered, one accumulating."""
        return sum(
            s.batch_size * (s.batch_concurrency + 2) for s in self.services.values() if s.batch_url
        )

    @property
    def busy(self) -> bool:
        """Calls in flight, outcomes not handled yet, or publishes not confirmed."""
        in_flight = any(b.in_flight for b in self._batchers.values())
        return in_flight or bool(self._done) or bool(self._publisher and len(self._publisher))

    # -- connection lifecycle (consumer thread) -------------------------------------------

    def open(self, connection) -> None:
        """Start publishing on ``connection`` (after every connect; before consuming)."""
        self._publisher = Publisher(connection)
        self._publisher.declare_dead_queues(self.services)
        self._cancel_queue = self._publisher.listen_for_cancels(
            self._streams.cancel, self._runtime.config.cancel_users
        )
        for batcher in self._batchers.values():
            batcher.attach(connection.connection.sock)
        self._taking = True

    def stop_taking(self) -> None:
        """Consuming stopped: no new message is taken, and those waiting for a call are
        let go (unacknowledged, they come back from the broker when the channel closes).
        Calls in flight still answer."""
        self._taking = False
        for batcher in self._batchers.values():
            batcher.drop_waiting()

    def close(self) -> None:
        """The channel is going: what is unconfirmed now is the broker's to redeliver."""
        self.stop_taking()
        self._streams.cancel_all()  # their parts could not be published any more
        if self._publisher is not None:
            self._publisher.close()

    def settle_outstanding(self, connection, timeout: float) -> None:
        """Warm shutdown, with consuming stopped: let the calls in flight finish, publish
        their answers and acknowledge their messages, for at most ``timeout`` seconds."""
        give_up = time.monotonic() + timeout
        while self.busy and time.monotonic() < give_up:
            _safely(self._finish_calls)
            try:
                connection.drain_events(timeout=0.05)
            except TimeoutError:
                continue
            except Exception as exc:  # the connection is gone: the broker redelivers
                log.warning("could not settle the requests in flight: %r", exc)
                return

    # -- taking messages (consumer thread) -------------------------------------------------

    def receive(self, message: Message) -> None:
        """Celery's task consumer hands every ``proxymq.forward`` message here."""
        _safely(self._take, message)

    def reject(self, message: Message, reason: str) -> None:
        """A message that is no task at all (undecodable, another task name)."""
        _safely(self._dead_letter_malformed, message, reason)

    def _take(self, message: Message) -> None:
        if not self._taking:
            return  # shutting down or reconnecting: it goes back to the queue
        try:
            delivery = take(message, self.services)
        except Malformed as exc:
            self._dead_letter_malformed(message, str(exc))
            return
        service = delivery.service
        if tracing.ENABLED:
            from workers.tracing import received

            received(delivery)
        self.events.received(delivery)
        if delivery.count == 1 and delivery.sent:
            wait = max(0.0, time.time() * 1000 - delivery.sent) / 1000
            metrics.queue_wait.labels(service.name).observe(wait)
        verdict = admit(
            delivery,
            healthy=self._runtime.health.healthy(service.name),
            has_result_store=self._runtime.jobs is not None,
        )
        if verdict is Verdict.CALL:
            self._batchers[service.queue].add(delivery)
        elif verdict is Verdict.EXPIRED:
            metrics.expired_total.labels(service.name).inc()
            self.events.expired(delivery)
            _ack(message)
            if delivery.trace is not None:
                delivery.trace.end(forwarding.timed_out(), "expired")
        elif verdict is Verdict.AGAIN:
            headers, properties = recounted(
                message.headers, properties_of(message), delivery.count, delivery.request.deadline
            )
            self._publisher.publish(
                service.queue, message.body, headers, properties, self._settler(message)
            )
            if delivery.trace is not None:
                delivery.trace.end(None, "published again")
        else:
            reason = f"{delivery.count - 1} deliveries, PROXYMQ_MAX_DELIVERIES is "
            reason += str(service.max_deliveries)
            poison.dead_letter(
                self._publisher, message, service.name, reason, self._settler(message)
            )
            self._answer_poison(delivery, poison.poison_reply(delivery.count - 1))

    def _dead_letter_malformed(self, message: Message, reason: str) -> None:
        if not self._taking:
            return
        queue = (message.delivery_info or {}).get("routing_key", "")
        service = queue.removesuffix(QUEUE_SUFFIX)
        poison.dead_letter(self._publisher, message, service, reason, self._settler(message))
        properties = message.properties or {}
        reply_to, correlation_id = properties.get("reply_to"), properties.get("correlation_id")
        if isinstance(reply_to, str) and isinstance(correlation_id, str) and reply_to:
            self._publisher.reply(reply_to, correlation_id, poison.poison_reply(1), _ignore)

    # -- calls (a call thread) -------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            _safely(self._work.get())

    def _start_call(self, service: ServiceConfig, batch: list[Delivery]) -> None:
        """From the batcher, in the consumer thread: hand the call to a call thread."""
        now = time.monotonic()
        for delivery in batch:
            delivery.started = now
            self.events.started(delivery)
        if service.batch_url:
            metrics.batch_wait.labels(service.name).observe(now - batch[0].taken)
            metrics.batch_size.labels(service.name).observe(len(batch))
        self._work.put(functools.partial(self._call, service, batch))

    def _call(self, service: ServiceConfig, batch: list[Delivery]) -> None:
        started = time.perf_counter()
        try:
            outcomes = self._call_and_store(service, batch)
        except Exception as exc:  # a bug must not lose the batch's answers
            log.exception("a call of %s failed", service.name)
            reply = forwarding.unavailable(f"the worker failed: {type(exc).__name__}")
            outcomes = [(d, reply, PUBLISH if d.answers_a_client else REQUEUE) for d in batch]
        self._done.append((service, outcomes, time.perf_counter() - started))
        self._consumer.call_soon(_safely, self._finish_calls)

    def _call_and_store(self, service: ServiceConfig, batch: list[Delivery]) -> list[Outcome]:
        runtime = self._runtime
        live: list[Delivery] = []
        skipped: list[Delivery] = []
        for delivery in batch:
            runs = not delivery.request.job or answering.start_job(runtime, delivery)
            (live if runs else skipped).append(delivery)
        replies: dict[str, ReplyEnvelope] = {}
        streamed: set[str] = set()
        if live:
            call_started = time.perf_counter()
            limit = runtime.config.max_response_bytes
            if service.batch_url:
                with _batch_span(service, live) as done:
                    replies = batch_call.call(runtime.http, live, limit)
                    done(replies)
            else:
                replies = {d.correlation_id: self._call_one(d, limit, streamed) for d in live}
            metrics.downstream_duration.labels(service.name).observe(
                time.perf_counter() - call_started
            )
        outcomes: list[Outcome] = [(d, None, ACKNOWLEDGE) for d in skipped]
        for delivery in live:
            reply = replies[delivery.correlation_id]
            metrics.downstream_requests_total.labels(service.name, str(reply.status)).inc()
            streams = delivery.correlation_id in streamed
            action = STREAMED if streams else self._store(delivery, reply)
            outcomes.append((delivery, reply, action))
        return outcomes

    def _call_one(self, delivery: Delivery, limit: int, streamed: set[str]) -> ReplyEnvelope:
        """A single call; an answer that streams is relayed here, part by part (and its
        correlation id added to ``streamed``)."""
        may_stream = delivery.answers_a_client and not delivery.request.job
        with _call_span(delivery) as done:
            result = forwarding.call(self._runtime.connections, delivery, limit, stream=may_stream)
            done(result)
        if not isinstance(result, Streaming):
            return result
        correlation_id, stream_id = delivery.correlation_id, uuid.uuid4().hex
        streamed.add(correlation_id)
        in_order = self._publish_in_order
        self._streams.add(correlation_id, stream_id, result)
        try:
            in_order(functools.partial(self._publish_head, delivery, result, stream_id))
            numbers = itertools.count(1)  # the head is 0

            def send(kind: str, body: bytes) -> None:
                part = StreamPart(kind, stream_id, next(numbers))
                in_order(functools.partial(self._publish_part, delivery, result, part, body))

            config = self._runtime.config
            ended = result.relay(send, config.stream_idle_timeout, limit)
        finally:
            self._streams.remove(correlation_id, stream_id)
        metrics.streams_total.labels(delivery.service.name, ended).inc()
        return result.head

    def _publish_in_order(self, step: Callable[[], None]) -> None:
        """From a call thread: run ``step`` in the consumer thread after every step handed
        over before it. Celery's ``call_soon`` keeps its callbacks in a set (kombu's Hub),
        which runs them in any order: a stream's parts wait in one deque instead."""
        self._parts.append(step)
        self._consumer.call_soon(_safely, self._drain_parts)

    def _drain_parts(self) -> None:
        while self._parts:
            _safely(self._parts.popleft())

    def _store(self, delivery: Delivery, reply: ReplyEnvelope) -> str:
        if not delivery.request.job:
            return PUBLISH if delivery.reply_to else ACKNOWLEDGE
        try:
            answering.finish_job(self._runtime, delivery, reply)
        except Exception:
            log.exception(
                "could not store job %s; returning it to the queue", delivery.correlation_id
            )
            return REQUEUE
        return ACKNOWLEDGE

    # -- answers (consumer thread) ---------------------------------------------------------

    def _finish_calls(self) -> None:
        while self._done:
            service, outcomes, seconds = self._done.popleft()
            try:
                for delivery, reply, action in outcomes:
                    # One by one: a publish that fails (the connection just went) must
                    # not keep its batch-mates from being settled.
                    _safely(self._settle_outcome, delivery, reply, action)
            finally:
                self._batchers[service.queue].call_done(seconds)

    def _settle_outcome(self, delivery: Delivery, reply: ReplyEnvelope | None, action: str) -> None:
        if reply is not None:
            self.events.answered(delivery, reply)
        traced = delivery.trace
        if traced is not None and action != PUBLISH:
            traced.end(reply, action)
        if action == STREAMED:
            return
        if action == PUBLISH:
            settled = self._settler(delivery.message)
            if traced is not None:
                settled = traced.replying(delivery.reply_to, reply, settled)
            self._publisher.reply(delivery.reply_to, delivery.correlation_id, reply, settled)
        elif action == REQUEUE:
            _requeue(delivery.message)
        else:
            _ack(delivery.message)

    def _answer_poison(self, delivery: Delivery, reply: ReplyEnvelope) -> None:
        """Tell a dead-lettered request's client (its message is settled by the dead
        letter's confirm): on its reply queue, or a job's in the result store."""
        self.events.answered(delivery, reply)
        if delivery.trace is not None:
            delivery.trace.end(reply, "dead-lettered")
        if delivery.answers_a_client:
            self._publisher.reply(delivery.reply_to, delivery.correlation_id, reply, _ignore)
        elif delivery.request.job and self._runtime.jobs is not None:
            self._work.put(functools.partial(self._store, delivery, reply))

    def _publish_head(self, delivery: Delivery, streaming: Streaming, stream_id: str) -> None:
        """A stream's status and headers. Its request is acknowledged as soon as the broker
        holds the head: a redelivery after that would start a second copy of a stream the
        client is already reading, so from then on a worker's death ends the stream
        instead (the gateway cuts the response off). Before the head, the request is
        redelivered as any other."""
        headers = StreamPart(HEAD, stream_id, 0, self._cancel_queue).headers()

        def settled(outcome: str) -> None:
            if outcome != ACK:  # no gateway will read the rest
                streaming.cancel()
            if outcome != LOST:
                _ack(delivery.message)

        body = encode_reply(streaming.head)
        self._publisher.reply_part(
            delivery.reply_to, delivery.correlation_id, body, headers, settled
        )

    def _publish_part(
        self, delivery: Delivery, streaming: Streaming, part: StreamPart, body: bytes
    ) -> None:
        headers = part.headers()

        def settled(outcome: str) -> None:
            if outcome != ACK:  # its gateway is gone (RETURNED), or our connection
                streaming.cancel()

        self._publisher.reply_part(
            delivery.reply_to, delivery.correlation_id, body, headers, settled
        )

    def _settler(self, message: Message) -> Callable[[str], None]:
        """What to do with ``message`` once the broker answers for what replaced it."""

        def settled(outcome: str) -> None:
            if outcome in (ACK, RETURNED):
                _ack(message)
            elif outcome == NACK:
                _requeue(message)
            # LOST: the connection is gone, and with it the message's delivery.

        return settled


def _call_span(delivery: Delivery):
    """The single call's client span while tracing is on, else nothing: one path either
    way, and ``workers.tracing`` (OpenTelemetry) is imported only when it is on."""
    if delivery.trace is None:
        return contextlib.nullcontext(_ignore)
    from workers.tracing import single_call

    return single_call(delivery)


def _batch_span(service: ServiceConfig, batch: list[Delivery]):
    """The batch call's span (linked to every item's trace) while tracing is on."""
    if not tracing.ENABLED:
        return contextlib.nullcontext(_ignore)
    from workers.tracing import batch_call as traced

    return traced(service, batch)


def _safely(step: Callable, *args) -> None:
    """Run one consumer-thread step; a bug in it must not stop the event loop."""
    try:
        step(*args)
    except Exception:
        # Unacknowledged, its message comes back when the channel closes.
        log.exception("a worker step failed")


def _ack(message: Message) -> None:
    try:
        message.ack()
    except Exception as exc:  # its channel is gone: the broker redelivers it
        log.debug("could not acknowledge a message: %r", exc)


def _requeue(message: Message) -> None:
    try:
        message.reject(requeue=True)
    except Exception as exc:
        log.debug("could not requeue a message: %r", exc)


def _ignore(*_) -> None:
    pass

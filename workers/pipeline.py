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

Spans, metrics and task events are observers (``workers.observers``): each step answers
(publishes, acknowledges, requeues, dead-letters) first and calls them after, each one
guarded, so none of them can keep a message from being answered or settled.
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
from proxymq.config import ServiceConfig
from proxymq.confirms import ACK, LOST, NACK, RETURNED
from proxymq.envelope import HEAD, ReplyEnvelope, StreamPart, encode_reply, recounted
from proxymq.parsers import QUEUE_SUFFIX
from workers import answering, batch_call, forwarding, metrics, poison
from workers.admission import Verdict, admit
from workers.announcer import Announcer
from workers.batching import Batcher
from workers.callback_queue import CallbackQueues
from workers.delivery import Delivery, Malformed, take
from workers.events import TaskEvents
from workers.flow import UNCALLED, CallOutcome, Flow, FlowState, Permit
from workers.flow import metrics as flow_metrics
from workers.flow.retry import RetryPolicy
from workers.observers import observe, observing, then
from workers.prefetch import Slot, StreamSlots, shift
from workers.publisher import Publisher, properties_of
from workers.runtime import Runtime
from workers.streaming import Streaming, Streams

log = logging.getLogger(__name__)

# What a call thread says of each delivery it handled.
PUBLISH = "publish"  # reply to the client's reply queue, ack once confirmed
ACKNOWLEDGE = "ack"  # answered elsewhere (a job), or a cancelled job: ack now
REQUEUE = "requeue"  # could not be answered: back to the queue
STREAMED = "streamed"  # relayed in parts, settled when its head was confirmed
CALLBACK = "callback"  # a job whose callback is due: ack once the broker holds it
RETRY = "retry"  # a failed call of a safe request: in line again after its backoff

Outcome = tuple[Delivery, ReplyEnvelope | None, str]


class Pipeline:
    def __init__(self, consumer, runtime: Runtime) -> None:
        """``consumer``: Celery's consumer (its timer, ``call_soon``, dispatcher)."""
        self._consumer = consumer
        self._runtime = runtime
        self.services = {s.queue: s for s in runtime.config.services.values()}
        self._flows = {s.queue: runtime.flows[s.name] for s in self.services.values()}
        self._retries = {
            s.queue: RetryPolicy(s, self._flows[s.queue].shared)
            for s in self.services.values()
            if s.retries
        }
        self._generation = 0  # of the connection: a retry of an older one's is dropped
        self._batchers = {
            s.queue: Batcher(
                s,
                self._flows[s.queue].local_calls(
                    s.batch_concurrency if s.batch_url else runtime.concurrency
                ),
                consumer.timer.call_after,
                functools.partial(self._start_call, s),
                self._flows[s.queue].closed_for,
            )
            for s in self.services.values()
        }
        self.events = TaskEvents(consumer)
        self._announcer = Announcer(
            consumer,
            lambda: consumer.hostname,
            self.services,
            {name: flow.state for name, flow in runtime.flows.items()},
            self._held,
        )
        self._publisher: Publisher | None = None
        self._callbacks = CallbackQueues(
            functools.partial(consumer.call_soon, _safely),
            runtime.config,
            runtime.jobs,
            runtime.callbacks,
        )
        self._streams = Streams()
        # The call threads the prefetch stands for: -c, or less under a concurrency cap.
        self._slots = StreamSlots(consumer, runtime.concurrency - self.prefetch_cut)
        # Under ``auto`` the prefetch follows the limit (``_follow_limit``).
        self._auto = any(f.leases is not None and f.leases.auto for f in self._flows.values())
        self._cut = self.prefetch_cut  # the cut applied (``cut_prefetch``)
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

    def _held(self, queue: str) -> int:
        """Messages of ``queue`` taken and waiting for a call (``workers.announcer``)."""
        return len(self._batchers[queue].waiting)

    @property
    def prefetch_cut(self) -> int:
        """Prefetch (Celery's ``-c``) the single-mode services cannot use: under a
        concurrency cap, a worker takes at most the cap's worth of requests, and the
        rest stays in the queue for workers that can call."""
        usable = sum(b.calls for q, b in self._batchers.items() if not self.services[q].batch_url)
        single = any(not s.batch_url for s in self.services.values())
        return max(0, self._runtime.concurrency - usable) if single else 0

    def cut_prefetch(self) -> int:
        """The cut to apply now (consumer thread, at start after Celery set ``-c``):
        ``prefetch_cut``, but under ``auto`` after the current limit (``Flow.prefetch``).
        Recorded: ``_follow_limit`` moves the prefetch from there as the limit moves."""
        single = [q for q, s in self.services.items() if not s.batch_url]
        threads = self._runtime.concurrency
        usable = sum(self._flows[q].prefetch(threads) for q in single)
        self._cut = max(0, threads - usable) if single else 0
        return self._cut

    def _follow_limit(self) -> None:
        """Under ``auto``, after a call: the prefetch follows the limit (it may have moved),
        so a worker holds about the calls it may make and leaves the rest in the queue."""
        if not self._auto or not self._taking:
            return
        before = self._cut
        by = before - self.cut_prefetch()  # a smaller cut: a larger prefetch
        if by:
            try:
                shift(self._consumer, by)
            except Exception as exc:  # the connection went: the reconnect sets it again
                log.warning("could not follow the concurrency limit's prefetch: %r", exc)

    def flow_state(self, service: str) -> FlowState:
        """``service``'s pause and breaker state (``workers.flow.state``), by name."""
        return self._runtime.flows[service].state

    @property
    def paused(self) -> bool:
        """Not consuming because every call thread relays a stream (``workers.prefetch``)."""
        return self._slots.paused

    @property
    def busy(self) -> bool:
        """Calls in flight, outcomes not handled yet, or publishes not confirmed."""
        in_flight = any(b.in_flight for b in self._batchers.values())
        return in_flight or bool(self._done) or bool(self._publisher and len(self._publisher))

    # -- connection lifecycle (consumer thread) -------------------------------------------

    def open(self, connection) -> None:
        """Start publishing on ``connection`` (after every connect; before consuming)."""
        self._generation += 1
        self._publisher = Publisher(connection)
        self._publisher.declare_dead_queues(self.services)
        if self._runtime.jobs is not None:  # only jobs have callbacks
            self._callbacks.open(connection, self._publisher, list(self.services.values()))
        self._cancel_queue = self._publisher.listen_for_cancels(
            self._streams.cancel, self._runtime.config.cancel_users
        )
        for batcher in self._batchers.values():
            batcher.attach(connection.connection.sock)
        self._taking = True
        self._slots.open()
        self._announcer.open(connection)

    def stop_taking(self) -> None:
        """Consuming stopped: no new message is taken, and those waiting for a call are
        let go (unacknowledged, they come back from the broker when the channel closes).
        Calls in flight still answer."""
        self._taking = False
        self._slots.close()
        for batcher in self._batchers.values():
            batcher.drop_waiting()

    def close(self) -> None:
        """The channel is going: what is unconfirmed now is the broker's to redeliver."""
        self.stop_taking()
        self._announcer.close()
        self._streams.cancel_all()  # their parts could not be published any more
        self._callbacks.close()
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

            observe(received, delivery)
        observe(self.events.received, delivery)
        if delivery.count == 1 and delivery.sent:
            observe(_queue_wait, delivery)
        if delivery.count == 1 and delivery.replayed is not None:
            observe(metrics.count, metrics.replayed_total, service.name)
        verdict = admit(
            delivery,
            healthy=self._runtime.health.healthy(service.name),
            has_result_store=self._runtime.jobs is not None,
        )
        if verdict is Verdict.CALL:
            self._batchers[service.queue].add(delivery)
        elif verdict is Verdict.EXPIRED:
            _ack(message)
            self._announcer.rates[service.queue].add()  # it left the queue too
            observe(metrics.count, metrics.expired_total, service.name)
            observe(self.events.expired, delivery)
            self._trace_end(delivery, forwarding.timed_out(), "expired")
        elif verdict is Verdict.AGAIN:
            headers, properties = recounted(
                message.headers, properties_of(message), delivery.count, delivery.request.deadline
            )
            self._publisher.publish(
                service.queue, message.body, headers, properties, self._settler(message)
            )
            self._trace_end(delivery, None, "published again")
        else:
            reason = f"{delivery.count - 1} deliveries, PROXYMQ_MAX_DELIVERIES is "
            reason += str(service.max_deliveries)
            poison.dead_letter(
                self._publisher, message, service.name, reason, self._dead_settler(message)
            )
            self._answer_poison(delivery, poison.poison_reply(delivery.count - 1))

    def _dead_letter_malformed(self, message: Message, reason: str) -> None:
        if not self._taking:
            return
        queue = (message.delivery_info or {}).get("routing_key", "")
        service = queue.removesuffix(QUEUE_SUFFIX)
        poison.dead_letter(self._publisher, message, service, reason, self._dead_settler(message))
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
        first = [d for d in batch if not d.started]  # not back from the flow control
        for delivery in first:
            delivery.started = now
        self._work.put(functools.partial(self._call, service, batch))
        self._announcer.rates[service.queue].add(len(first))  # retries left it once
        for delivery in first:
            observe(self.events.started, delivery)
        if service.batch_url:
            observe(metrics.measure, metrics.batch_wait, service.name, now - batch[0].taken)
            observe(metrics.measure, metrics.batch_size, service.name, len(batch))

    def _call(self, service: ServiceConfig, batch: list[Delivery]) -> None:
        flow = self._flows[service.queue]
        try:
            permit = self._enter(flow, service, batch)
        except Exception:  # flow control never stops a service that would otherwise be served
            log.exception("the flow control of %s failed; calling without it", service.name)
            permit = UNCALLED
        if permit is None:
            return  # back to its batcher, to wait
        started = time.perf_counter()
        try:
            outcomes = self._call_and_store(service, batch)
        except Exception as exc:  # a bug must not lose the batch's answers
            log.exception("a call of %s failed", service.name)
            reply = forwarding.unavailable(f"the worker failed: {type(exc).__name__}")
            outcomes = [(d, reply, PUBLISH if d.answers_a_client else REQUEUE) for d in batch]
        seconds = time.perf_counter() - started
        # The call's answer: a single call's, or a batch call's that failed as a whole.
        answer = outcomes[0][1] if len({id(o[1]) for o in outcomes}) == 1 else None
        streamed = any(action == STREAMED for _, _, action in outcomes)
        try:
            flow.leave(permit, _outcome(answer, seconds, streamed))
        finally:
            self._done.append((service, outcomes, seconds))
            self._consumer.call_soon(_safely, self._finish_calls)

    def _enter(self, flow: Flow, service: ServiceConfig, batch: list[Delivery]) -> Permit | None:
        """The flow control's permit for ``batch``'s call, or None when it must wait (it
        is handed back to its batcher). A batch whose deadlines all passed needs none:
        it is answered 504 without a call."""
        now = time.monotonic()
        if all(d.due <= now for d in batch):
            return UNCALLED
        entered = flow.enter()
        batcher = self._batchers[service.queue]
        if not isinstance(entered, Permit):
            self._consumer.call_soon(_safely, batcher.refused, batch, entered)
            return None
        if batcher.held:
            self._consumer.call_soon(_safely, batcher.admitted)
        if flow.limited:
            waited = now - min(d.started for d in batch)
            observe(metrics.measure, flow_metrics.flow_wait, service.name, waited)
        return entered

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
                with observing(_batch_span, service, live) as done:
                    replies = batch_call.call(runtime.http, live, limit)
                    done(replies)
            else:
                replies = {d.correlation_id: self._call_one(d, limit, streamed) for d in live}
            took = time.perf_counter() - call_started
            observe(metrics.measure, metrics.downstream_duration, service.name, took)
        outcomes: list[Outcome] = []
        for delivery in skipped:
            unsent = answering.unsent_callback(runtime, delivery)
            outcomes.append((delivery, unsent, CALLBACK if unsent else ACKNOWLEDGE))
        retry = self._retries.get(service.queue) if live else None
        if retry is not None:
            retry.called()
            if service.batch_url and len({id(r) for r in replies.values()}) > 1:
                retry = None  # a batch's items are retried only when the whole call failed
        for delivery in live:
            reply = replies[delivery.correlation_id]
            status = str(reply.status)
            observe(metrics.count, metrics.downstream_requests_total, service.name, status)
            if delivery.correlation_id in streamed:
                action = STREAMED
            elif retry is not None and self._retry_due(retry, delivery, reply):
                action = RETRY
            else:
                action = self._store(delivery, reply)
            outcomes.append((delivery, reply, action))
        return outcomes

    @staticmethod
    def _retry_due(retry: RetryPolicy, delivery: Delivery, reply: ReplyEnvelope) -> bool:
        wait = retry.after(delivery, reply)
        if wait is None:
            return False
        delivery.attempt += 1
        delivery.retry_in = wait
        return True

    def _call_one(self, delivery: Delivery, limit: int, streamed: set[str]) -> ReplyEnvelope:
        """A single call; an answer that streams is relayed here, part by part (and its
        correlation id added to ``streamed``)."""
        may_stream = delivery.answers_a_client and not delivery.request.job
        with observing(_call_span, delivery) as done:
            result = forwarding.call(self._runtime.connections, delivery, limit, stream=may_stream)
            done(result)
        if not isinstance(result, Streaming):
            return result
        correlation_id, stream_id = delivery.correlation_id, uuid.uuid4().hex
        streamed.add(correlation_id)
        in_order = self._publish_in_order
        self._streams.add(correlation_id, stream_id, result)
        slot = Slot()
        try:
            in_order(functools.partial(self._publish_head, delivery, result, stream_id, slot))
            numbers = itertools.count(1)  # the head is 0

            def send(kind: str, body: bytes) -> None:
                part = StreamPart(kind, stream_id, next(numbers))
                in_order(functools.partial(self._publish_part, delivery, result, part, body))

            config = self._runtime.config
            ended = result.relay(send, config.stream_idle_timeout, limit)
        finally:
            self._streams.remove(correlation_id, stream_id)
            # After its last part: its call thread is free again (``workers.prefetch``).
            in_order(functools.partial(self._slots.release, slot))
        observe(metrics.count, metrics.streams_total, delivery.service.name, ended)
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
            callback_due = answering.finish_job(self._runtime, delivery, reply)
        except Exception:
            log.exception(
                "could not store job %s; returning it to the queue", delivery.correlation_id
            )
            return REQUEUE
        return CALLBACK if callback_due else ACKNOWLEDGE

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
        self._follow_limit()

    def _settle_outcome(self, delivery: Delivery, reply: ReplyEnvelope | None, action: str) -> None:
        """Answer or settle first, observe after (a streamed answer is settled by its
        head's confirm). A published reply's span starts before the publish and ends
        after the request's ack, guarded on both ends."""
        if action == RETRY:
            retried = functools.partial(_safely, self._retry, delivery, self._generation)
            self._consumer.timer.call_after(delivery.retry_in, retried)
            return
        traced = delivery.trace
        if action == PUBLISH:
            sent = None if traced is None else observe(traced.replying, delivery.reply_to, reply)
            settled = then(self._settler(delivery.message), sent)
            self._publisher.reply(delivery.reply_to, delivery.correlation_id, reply, settled)
        elif action == REQUEUE:
            _requeue(delivery.message)
        elif action == CALLBACK:
            self._publish_callback(delivery, reply, self._settler(delivery.message))
        elif action != STREAMED:
            _ack(delivery.message)
        if reply is not None:
            observe(self.events.answered, delivery, reply)
        if action != PUBLISH:
            self._trace_end(delivery, reply, action)

    def _retry(self, delivery: Delivery, generation: int) -> None:
        """Its backoff is over: in line for a call again (through the flow control).
        Not if its channel went meanwhile: the broker delivers it again."""
        if self._taking and generation == self._generation:
            self._batchers[delivery.service.queue].add(delivery)

    @staticmethod
    def _trace_end(delivery: Delivery, reply: ReplyEnvelope | None, outcome: str) -> None:
        if delivery.trace is not None:
            observe(delivery.trace.end, reply, outcome)

    def _answer_poison(self, delivery: Delivery, reply: ReplyEnvelope) -> None:
        """Tell a dead-lettered request's client (its message is settled by the dead
        letter's confirm): on its reply queue, or a job's in the result store."""
        if delivery.answers_a_client:
            self._publisher.reply(delivery.reply_to, delivery.correlation_id, reply, _ignore)
        elif delivery.request.job and self._runtime.jobs is not None:
            self._work.put(functools.partial(self._store_poison, delivery, reply))
        observe(self.events.answered, delivery, reply)
        self._trace_end(delivery, reply, "dead-lettered")

    def _store_poison(self, delivery: Delivery, reply: ReplyEnvelope) -> None:
        """In a call thread: a dead-lettered job's poison answer, stored, and its callback
        published from the consumer thread (its message is settled by the dead letter)."""
        if self._store(delivery, reply) == CALLBACK:
            step = functools.partial(self._publish_callback, delivery, reply, _ignore)
            self._consumer.call_soon(_safely, step)

    def _publish_callback(
        self, delivery: Delivery, reply: ReplyEnvelope, settled: Callable[[str], None]
    ) -> None:
        """A stored job's callback, for its submitter (``answering`` read it from the job's
        record when it stored the answer)."""
        url, cid = delivery.request.callback, delivery.correlation_id
        service, submitter = delivery.service.name, delivery.submitter
        self._callbacks.enqueue(service, url, cid, submitter, reply, settled)

    def _publish_head(
        self, delivery: Delivery, streaming: Streaming, stream_id: str, slot: Slot
    ) -> None:
        """A stream's status and headers. Its request is acknowledged as soon as the broker
        holds the head: a redelivery after that would start a second copy of a stream the
        client is already reading, so from then on a worker's death ends the stream
        instead (the gateway cuts the response off). Before the head, the request is
        redelivered as any other. The ack does not free a prefetch slot while the call
        thread still relays (``workers.prefetch``)."""
        headers = StreamPart(HEAD, stream_id, 0, self._cancel_queue).headers()

        def settled(outcome: str) -> None:
            if outcome != ACK:  # no gateway will read the rest
                streaming.cancel()
            if outcome != LOST:
                self._slots.acknowledge(slot, functools.partial(_ack, delivery.message))

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

    def _dead_settler(self, message: Message) -> Callable[[str], None]:
        """As ``_settler``, for a dead letter: one no queue took (its ``<queue>.dead`` was
        deleted under the worker) was confirmed all the same, and acknowledging the
        original lost it. The dead queue is declared again instead, and the original
        requeued, to be dead-lettered into it when it comes back."""
        settle = self._settler(message)
        queue = (message.delivery_info or {}).get("routing_key", "")

        def settled(outcome: str) -> None:
            if outcome == RETURNED and queue in self.services:
                log.warning("%s%s is gone: declaring it again", queue, poison.DEAD_SUFFIX)
                self._publisher.declare_dead_queue(queue, self.services[queue], nowait=True)
                _requeue(message)
            else:
                settle(outcome)

        return settled


def _outcome(answer: ReplyEnvelope | None, seconds: float, streamed: bool) -> CallOutcome:
    """What the flow control learns from a call: its answer (a batch call's that went
    well has none of its own), or that none came."""
    if answer is None:
        return CallOutcome(200, [], seconds)
    return CallOutcome(
        answer.status,
        answer.headers,
        seconds,
        answered=answer.error != "downstream-unavailable",
        cut_by_deadline=answer.error == "timeout",
        streamed=streamed,
    )


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


def _queue_wait(delivery: Delivery) -> None:
    wait = max(0.0, time.time() * 1000 - delivery.sent) / 1000
    metrics.queue_wait.labels(delivery.service.name).observe(wait)


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

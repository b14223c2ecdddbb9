"""Batch mode: a Celery consumer bootstep that sends a service's requests in batches.

A service with ``batch_url`` set is served here instead of by the ``proxymq.forward``
task: ``BatchStep`` consumes its queue with a Kombu consumer of its own (one channel,
one ``Batcher`` per service, so services never share a batch) and takes the queue out
of the queues Celery's task consumer reads.

Why a bootstep and not celery-batches: celery-batches does not install with Celery 5.7
(every release pins an older Celery), and its design is a fixed flush timer that runs
whether or not the downstream is busy, so a lone request always waits out the window.
A bootstep keeps the messages themselves, which is what the closing rule needs.

The closing rule (``Batcher._pump``): a batch goes when it is full, when its first
request has waited ``batch_wait_ms``, or when its nearest deadline would otherwise be
missed (deadline minus the recent batch-call time); and when no call of this service
is in flight and nothing more is waiting in the prefetch buffer (the connection has no
unread bytes), whatever is there goes at once. So a lone request on an idle worker is
not delayed, and under load requests accumulate while a call is in flight and all go
as the next batch when it returns ("continuous batching"). At most
``batch_concurrency`` calls per service are in flight. The prefetch is
``batch_size * (batch_concurrency + 2)``: a full batch in each call, one being
answered (replies publishing, acks pending), one accumulating.

Threads. Kombu calls ``on_message`` in the consumer thread (the thread running
Celery's event loop), and Kombu channels are not thread-safe. So all batch state, the
timers and every ack or reject live in that thread; the batch call runs in a small
``ThreadPoolExecutor`` (``batch_concurrency`` threads per service) and a batch's replies
are published from another pool through ``runtime.current().publisher`` (thread-safe,
its own connections), all together with one wait for their confirms. A finished call
and a published reply come back to the consumer thread through ``Consumer.call_soon``,
Celery's own route for acks from pool threads (it wakes the event loop). Acks go through
a queue drained in the consumer thread, which also lets a warm shutdown settle them
before the channel closes. A message is acknowledged only after its reply is published
(acks late): a killed worker's batch is redelivered. Timers are the event loop's own
(``c.timer``), firing in that thread. Batch mode is built for the default pool (threads,
which runs Celery's event loop); with ``-P gevent`` it works the same way but acks may
wait for the next loop turn.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import select
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import msgpack
from celery import bootsteps
from kombu import Consumer as KombuConsumer
from kombu.common import ignore_errors
from kombu.message import Message

from proxymq.config import ServiceConfig
from proxymq.envelope import TASK_NAME, ReplyEnvelope, RequestEnvelope
from workers import answering, batch_call, forwarding, metrics, runtime
from workers.admission import Delivery, admit
from workers.batch_call import Item
from workers.consumer import dead_letter_message

log = logging.getLogger(__name__)

RECHECK_S = 0.001  # bytes still unread: look again this soon
ESTIMATE_WEIGHT = 0.2  # of the newest batch-call time in the running estimate
UNHEALTHY_RECHECK_S = 0.5


def batch_services() -> list[ServiceConfig]:
    return [s for s in runtime.current().config.services.values() if s.batch_url]


@dataclass(slots=True)
class Waiting:
    """A request taken off the queue, waiting for its batch."""

    message: Message
    item: Item
    reply_to: str | None
    received: float  # monotonic
    due: float  # monotonic time of its deadline


class Loop:
    """The consumer thread's event loop, as the batchers use it."""

    def __init__(self, consumer) -> None:
        self._consumer = consumer

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the consumer thread; safe from any thread."""
        self._consumer.call_soon(callback)

    def call_after(self, seconds: float, callback: Callable[[], None]):
        return self._consumer.timer.call_after(seconds, callback)


class Batcher:
    """One service's batches. Every method but ``_call`` and ``_reply`` runs in the
    consumer thread, so the state needs no lock."""

    def __init__(self, service: ServiceConfig, loop: Loop) -> None:
        self.service = service
        self._loop = loop
        self._waiting: deque[Waiting] = deque()
        self._in_flight = 0
        self._timer = None
        self._timer_at = math.inf
        self._estimate = 0.0  # seconds a batch call takes, running average
        self._settled: deque[tuple[Message, bool]] = deque()  # (message, requeue)
        self._futures: set[concurrent.futures.Future] = set()
        self._unread: Callable[[], bool] = lambda: False
        name = service.name
        self._calls = ThreadPoolExecutor(service.batch_concurrency, f"batch-{name}")
        # One batch's replies being confirmed while the next batch's are published.
        replies = 2 * service.batch_concurrency
        self._replies = ThreadPoolExecutor(replies, f"batch-reply-{name}")

    @property
    def prefetch(self) -> int:
        return self.service.batch_size * (self.service.batch_concurrency + 2)

    def attach(self, channel, queue) -> KombuConsumer:
        """Consume ``queue`` on ``channel`` (a fresh one after each reconnection)."""
        self._waiting.clear()  # unacked on the old channel: the broker redelivers them
        self._unread = _unread_bytes(channel.connection)
        channel.basic_qos(0, self.prefetch, False)
        return KombuConsumer(channel, queues=[queue], on_message=self.on_message, no_ack=False)

    # -- taking requests -----------------------------------------------------------------

    def on_message(self, message: Message) -> None:
        try:
            waiting = self._admit(message)
        except Exception:
            # Left unacknowledged: it comes back when this channel closes.
            log.exception("could not take a request of %s", self.service.name)
            return
        if waiting is not None:
            self._waiting.append(waiting)
        self._pump()

    def _admit(self, message: Message) -> Waiting | None:
        """The request to batch, or None when it was settled here already."""
        try:
            request, correlation_id = decode(message)
        except ValueError as exc:
            dead_letter_message(message, str(exc))  # acks, or leaves it for redelivery
            return None
        reply_to = message.properties.get("reply_to")
        service = self.service
        if request.service != service.name:
            reply = forwarding.unavailable(f"{service.queue} does not serve {request.service!r}")
            answering.answer(runtime.current(), request, correlation_id, reply_to, reply)
            message.ack()
            return None
        delivery = Delivery(
            request=request,
            correlation_id=correlation_id,
            reply_to=reply_to,
            queue=service.queue,
            headers=message.headers or {},
            redelivered=bool((message.delivery_info or {}).get("redelivered")),
        )
        # Health is the closing rule's to watch (the batcher holds its batches), not ours.
        deliveries = admit(runtime.current(), service, delivery, hold=False)
        if deliveries is None:
            message.ack()
            return None
        now = time.time()
        received = time.monotonic()
        due = received + request.deadline / 1000 - now
        item = Item(correlation_id, request, deliveries)
        return Waiting(message, item, reply_to, received, due)

    # -- the closing rule ----------------------------------------------------------------

    def _pump(self) -> None:
        """Send every batch the closing rule allows; arm the timer for the next one."""
        size = self.service.batch_size
        while self._waiting and self._in_flight < self.service.batch_concurrency:
            if not runtime.current().health.healthy(self.service.name):
                self._arm(time.monotonic() + UNHEALTHY_RECHECK_S)
                return
            close_at = self._close_at()
            now = time.monotonic()
            idle = self._in_flight == 0
            if len(self._waiting) >= size or now >= close_at or (idle and not self._unread()):
                self._send([self._waiting.popleft() for _ in range(min(size, len(self._waiting)))])
                continue
            self._arm(min(close_at, now + RECHECK_S) if idle else close_at)
            return

    def _close_at(self) -> float:
        """When the next batch must go: its first request's window, or in time for its
        nearest deadline given how long calls take."""
        head = list(islice(self._waiting, self.service.batch_size))
        window = head[0].received + self.service.batch_wait_ms / 1000
        return min(window, min(w.due for w in head) - self._estimate)

    def _arm(self, at: float) -> None:
        if at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_after(max(0.0, at - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._pump()

    def _send(self, batch: list[Waiting]) -> None:
        now = time.monotonic()
        live = [w for w in batch if w.due > now]
        for gone in (w for w in batch if w.due <= now):
            metrics.expired_total.labels(self.service.name).inc()
            self._settle(gone.message, requeue=False)
        self._drain()
        if not live:
            return
        metrics.batch_wait.labels(self.service.name).observe(now - live[0].received)
        metrics.batch_size.labels(self.service.name).observe(len(live))
        self._in_flight += 1
        self._track(self._calls.submit(self._call, live))

    def _call_done(self, seconds: float) -> None:
        self._in_flight -= 1
        self._estimate += ESTIMATE_WEIGHT * (seconds - self._estimate)
        self._pump()

    # -- worker threads ------------------------------------------------------------------

    def _call(self, batch: list[Waiting]) -> None:
        """In a call thread: the batch call, then hand each reply to the reply pool."""
        name = self.service.name
        started = time.perf_counter()
        try:
            replies = batch_call.call(runtime.current().http, self.service, [w.item for w in batch])
        except Exception as exc:  # a bug must not lose the batch's answers
            log.exception("batch call of %s failed", name)
            replies = {w.item.correlation_id: batch_call.bad_batch(repr(exc)) for w in batch}
        seconds = time.perf_counter() - started
        self._loop.call_soon(lambda: self._call_done(seconds))
        metrics.downstream_duration.labels(name).observe(seconds)
        answered = [(w, replies[w.item.correlation_id]) for w in batch]
        for _, reply in answered:
            metrics.downstream_requests_total.labels(name, str(reply.status)).inc()
        self._track(self._replies.submit(self._reply, answered))

    def _reply(self, answered: list[tuple[Waiting, ReplyEnvelope]]) -> None:
        """In a reply thread (the call thread is free for the next batch): publish the
        batch's replies with one wait for all their confirms, store its jobs' results,
        and have each message acknowledged, or requeued when its answer failed."""
        state = runtime.current()
        together = [(w, r) for w, r in answered if _is_reply(w)]
        if together and self._reply_together(state, together):
            alone = [(w, r) for w, r in answered if not _is_reply(w)]
        else:
            alone = answered
        for waiting, reply in alone:
            item = waiting.item
            try:
                answering.answer(state, item.request, item.correlation_id, waiting.reply_to, reply)
            except Exception:
                log.exception("could not answer a request of %s; requeueing", self.service.name)
                self._settle(waiting.message, requeue=True)
            else:
                self._settle(waiting.message, requeue=False)
        self._loop.call_soon(self._drain)

    def _reply_together(
        self, state: runtime.Runtime, together: list[tuple[Waiting, ReplyEnvelope]]
    ) -> bool:
        """Publish replies as one list and settle their messages; False when the list
        failed as a whole, so that one bad reply does not send its batch back to the
        queue: the caller then answers them one by one."""
        triples = [(w.reply_to, w.item.correlation_id, r) for w, r in together]
        try:
            confirmed = state.publisher.reply_many(triples)
        except Exception:
            log.exception("could not publish the replies of %s together", self.service.name)
            return False
        for (waiting, _), ok in zip(together, confirmed, strict=True):
            self._settle(waiting.message, requeue=not ok)
        self._loop.call_soon(self._drain)  # their acks need not wait for the jobs
        return True

    # -- acks (consumer thread) ----------------------------------------------------------

    def _settle(self, message: Message, requeue: bool) -> None:
        self._settled.append((message, requeue))  # deque.append is thread-safe

    def _drain(self) -> None:
        while self._settled:
            message, requeue = self._settled.popleft()
            try:
                message.reject(requeue=True) if requeue else message.ack()
            except Exception as exc:  # its channel is gone: the broker redelivers it
                log.warning("could not settle a message of %s: %r", self.service.name, exc)

    def _track(self, future: concurrent.futures.Future) -> None:
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def finish(self, timeout: float) -> None:
        """Warm shutdown: let calls in flight answer, then settle their messages."""
        deadline = time.monotonic() + timeout
        while self._futures and time.monotonic() < deadline:
            concurrent.futures.wait(list(self._futures), timeout=deadline - time.monotonic())
        self._drain()
        self._waiting.clear()


def _is_reply(waiting: Waiting) -> bool:
    """Answered on the gateway's reply queue (a job's answer goes to the result store)."""
    return bool(waiting.reply_to) and not waiting.item.request.job


def decode(message: Message) -> tuple[RequestEnvelope, str]:
    """The request and its correlation id; ``ValueError`` when it is not a ProxyMQ one."""
    headers = message.headers or {}
    if headers.get("task") != TASK_NAME:
        raise ValueError(f"not a {TASK_NAME} task message")
    try:
        args = msgpack.unpackb(message.body, raw=False)[0]
        request = RequestEnvelope.from_wire(args[0])
    except Exception as exc:
        raise ValueError(f"cannot be decoded: {exc!r}") from None
    correlation_id = message.properties.get("correlation_id") or headers.get("id")
    if not correlation_id:
        raise ValueError("no correlation id")
    return request, str(correlation_id)


def _unread_bytes(connection) -> Callable[[], bool]:
    """Whether the broker has sent more than has been read: the prefetch buffer is not
    empty, so another request may be about to arrive."""
    transport = getattr(connection, "transport", None)
    sock = getattr(connection, "sock", None)

    def unread() -> bool:
        try:
            if getattr(transport, "_read_buffer", b""):
                return True
            return bool(sock and select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    return unread


class BatchStep(bootsteps.ConsumerStep):
    """Registered with ``app.steps["consumer"]``; inert when no service is in batch mode."""

    def __init__(self, c, **kwargs) -> None:
        super().__init__(c, **kwargs)
        services = batch_services()
        loop = Loop(c)
        self.batchers = {s.name: Batcher(s, loop) for s in services}
        # Celery's task consumer must not read these queues too.
        queues = c.app.amqp.queues
        self._queues = {s.queue: queues[s.queue] for s in services}
        queues.deselect(list(self._queues))

    def include_if(self, c) -> bool:
        return bool(batch_services())

    def get_consumers(self, channel) -> list[KombuConsumer]:
        """One channel for all batch queues, each consumer with its own prefetch: a
        basic.qos applies to the consumers started after it, so each consumer is set up
        and started in turn (``ConsumerStep.start``'s own ``consume()`` is then a no-op)."""
        consumers = []
        for batcher in self.batchers.values():
            consumer = batcher.attach(channel, self._queues[batcher.service.queue])
            consumer.consume()
            consumers.append(consumer)
        return consumers

    def stop(self, c) -> None:
        self._finish(c)
        super().stop(c)

    def shutdown(self, c) -> None:
        self._finish(c)
        super().shutdown(c)

    def _finish(self, c) -> None:
        for consumer in self.consumers or []:
            ignore_errors(c.connection, consumer.cancel)
        connected = bool(c.connection and c.connection.connected)
        for batcher in self.batchers.values():
            batcher.finish(batcher.service.downstream_timeout if connected else 0)

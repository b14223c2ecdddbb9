"""Job callbacks through the broker: ``<service>_callbacks`` and its retry queues.

A finished job's callback is a persistent message on ``<service>_callbacks``, published
from the consumer thread; the job's request is acknowledged only once the broker holds
it (``workers.pipeline``). Any worker of the service takes it from there and attempts it
(``workers.callbacks``), holding the message unacknowledged meanwhile, so a worker that
dies mid-attempt leaves it to another.

A failed attempt is published to a retry queue, ``<service>_callbacks.retry.<ms>``, whose
messages expire after ``<ms>`` and are dead-lettered by RabbitMQ itself back to
``<service>_callbacks`` (``x-message-ttl``, ``x-dead-letter-exchange`` the default
exchange: no plugin). One queue per delay, so every message in it expires in order at
its head. The delays are ``DELAYS`` (about 5 s, 30 s, 2 min, 10 min, 1 h, then 1 h again)
for ``PROXYMQ_CALLBACK_RETRIES`` retries; the message is acknowledged once its retry
copy is confirmed. The job record says ``callback: delivered | retrying | failed``.

Only callbacks the workers' own broker user published are taken (``user_id``, which
RabbitMQ checks against the publishing connection and keeps through dead-lettering): a
callback is POSTed signed with ``PROXYMQ_CALLBACK_SECRET``, so whoever else may publish
to the queue (the gateway's user can publish anywhere through the default exchange) must
not be able to have a forged answer signed and sent.

A callback carries its job's submitter (``SUBMITTER_HEADER``: the job's owner hash, which
the job record holds; never the credential), so that the worker sending it can be fair
between submitters (``workers.callbacks.FairQueue``). A message without it, published by
an older worker, counts as anonymous.

A worker already holding ``SUBMITTER_BACKLOG`` callbacks of the same submitter, or
``HOST_BACKLOG`` for the same host, sends the next one to the first retry queue without
attempting it (the attempt count unchanged): prefetched messages for one slow receiver,
or for one submitter's many, would otherwise keep every other callback from being taken.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import amqp

from proxymq.config import ServiceConfig, WorkerConfig
from proxymq.confirms import ACK, NACK, RETURNED
from proxymq.envelope import ReplyEnvelope
from proxymq.jobs import DELIVERED, FAILED, RETRYING, JobStore
from workers import metrics
from workers.callbacks import Callback, CallbackSender, payload
from workers.observers import observe
from workers.publisher import Publisher

log = logging.getLogger(__name__)

SUFFIX = "_callbacks"
URL_HEADER = "x-proxymq-callback-url"
ATTEMPTS_HEADER = "x-proxymq-callback-attempts"
SUBMITTER_HEADER = "x-proxymq-callback-submitter"
DELAYS = (5, 30, 120, 600, 3600)  # seconds before retry 1, 2, ...; the last repeats
PREFETCH = 64  # callbacks a worker holds per service


def queue_of(service: str) -> str:
    return service + SUFFIX


def retry_queue(service: str, delay_ms: int) -> str:
    return f"{queue_of(service)}.retry.{delay_ms}"


def delays_ms(config: WorkerConfig) -> list[int]:
    """The delay before each retry, in ms (``PROXYMQ_CALLBACK_DELAY_SCALE``: tests only)."""
    scale = config.callback_delay_scale
    return [
        max(1, round(DELAYS[min(n, len(DELAYS) - 1)] * scale * 1000))
        for n in range(max(1, config.callback_retries))
    ]


class CallbackQueues:
    """The consumer thread's side of callbacks: publish, consume, settle."""

    def __init__(
        self,
        call_soon: Callable[..., None],
        config: WorkerConfig,
        jobs: JobStore | None,
        sender: CallbackSender,
    ) -> None:
        self._call_soon = call_soon
        self._config = config
        self._jobs = jobs
        self._sender = sender
        self._delays = delays_ms(config)
        self._publisher: Publisher | None = None
        self._channel = None
        self._user = ""
        self._services: dict[str, ServiceConfig] = {}

    def open(self, connection, publisher: Publisher, services: list[ServiceConfig]) -> None:
        """Declare each service's callback queues and consume them (after every connect,
        before consuming requests)."""
        self._publisher = publisher
        self._user = connection.userid
        self._services = {service.name: service for service in services}
        channel = self._channel = connection.channel()
        channel.auto_decode = False
        channel.basic_qos(0, PREFETCH, False)
        for service in services:
            self._consume(channel, service)

    def _consume(self, channel, service: ServiceConfig) -> None:
        self._declare(channel, service)
        received = functools.partial(self._received, channel, service.name)
        cancelled = functools.partial(self._cancelled, channel, service)
        channel.basic_consume(queue_of(service.name), callback=received, on_cancel=cancelled)

    def _cancelled(self, channel, service: ServiceConfig, consumer_tag: str) -> None:
        """The broker ended our consumer: its queue was deleted. Declare it again and go
        on consuming (in the consumer thread, outside the broker's callbacks)."""
        log.warning("the callback queue of %s was deleted; declaring it again", service.name)
        self._call_soon(self._consume_again, channel, service)

    def _consume_again(self, channel, service: ServiceConfig) -> None:
        if channel is self._channel:
            self._consume(channel, service)

    def _declare(self, channel, service: ServiceConfig, nowait: bool = False) -> None:
        typed = {"x-queue-type": "quorum"} if service.queue_type == "quorum" else {}
        channel.queue_declare(
            queue_of(service.name), durable=True, auto_delete=False, arguments=typed, nowait=nowait
        )
        for delay in sorted(set(self._delays)):
            arguments = {
                **typed,
                "x-message-ttl": delay,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue_of(service.name),
            }
            channel.queue_declare(
                retry_queue(service.name, delay),
                durable=True,
                auto_delete=False,
                arguments=arguments,
                nowait=nowait,
            )

    def close(self) -> None:
        """The connection is going: messages held now come back from the broker."""
        self._channel = None

    def enqueue(
        self,
        service: str,
        url: str,
        correlation_id: str,
        submitter: str,
        reply: ReplyEnvelope,
        settled: Callable[[str], None],
    ) -> None:
        """Publish a finished job's callback; ``settled`` gets the broker's answer.
        ``submitter``: the job's owner, as its record holds it.

        Mandatory: a callback queue deleted since this worker connected would otherwise
        swallow the callback while its request is acknowledged. A returned callback is
        published again once the queues are declared again; returned twice, its request
        is given back (NACK) to be called again rather than acknowledged."""
        callback = Callback(url, correlation_id, payload(correlation_id, reply), 0, submitter)

        def published(outcome: str) -> None:
            if outcome == RETURNED:
                self._call_soon(self._declare_and_publish, service, callback, settled)
            else:
                settled(outcome)

        self._publish(queue_of(service), callback, published, mandatory=True)

    def _declare_and_publish(
        self, service: str, callback: Callback, settled: Callable[[str], None]
    ) -> None:
        """In the consumer thread, outside the broker's callbacks (the declare waits)."""
        log.warning("the callback queue of %s was missing; declaring it again", service)
        try:
            self._declare(self._channel, self._services[service])
        except Exception as exc:  # the connection is going: its request is redelivered
            log.warning("could not declare the callback queues again: %r", exc)
            settled(NACK)
            return

        def published(outcome: str) -> None:
            settled(NACK if outcome == RETURNED else outcome)

        self._publish(queue_of(service), callback, published, mandatory=True)

    def _publish(
        self,
        queue: str,
        callback: Callback,
        settled: Callable[[str], None],
        mandatory: bool = False,
    ) -> None:
        headers = {
            URL_HEADER: callback.url,
            ATTEMPTS_HEADER: callback.attempts,
            SUBMITTER_HEADER: callback.submitter,
        }
        properties = {
            "correlation_id": callback.correlation_id,
            "content_type": "application/json",
            "delivery_mode": 2,
            "user_id": self._user,
        }
        self._publisher.publish(queue, callback.body, headers, properties, settled, mandatory)

    # -- consumer thread: a callback message arrives ------------------------------------

    def _received(self, channel, service: str, message: amqp.Message) -> None:
        tag = message.delivery_tag
        headers = message.properties.get("application_headers") or {}
        url, attempts = headers.get(URL_HEADER), headers.get(ATTEMPTS_HEADER)
        submitter = headers.get(SUBMITTER_HEADER, "")  # none: an older worker's, anonymous
        correlation_id = message.properties.get("correlation_id")
        user = message.properties.get("user_id")
        if user != self._user:
            log.warning("dropped a callback on %s from broker user %r", queue_of(service), user)
            channel.basic_ack(tag)
            return
        if not _well_formed(url, attempts, correlation_id, submitter):
            log.warning("dropped a malformed callback message on %s", queue_of(service))
            channel.basic_ack(tag)
            return
        callback = Callback(url, correlation_id, bytes(message.body), attempts, submitter)
        if self._sender.busy_with(callback):
            self._retry(channel, tag, service, callback, callback.attempts, "deferred")
            return
        done = functools.partial(self._attempted, channel, tag, service)
        self._sender.submit(callback, done)

    def _attempted(self, channel, tag: int, service: str, callback: Callback, ok: bool) -> None:
        """In a sender thread: record the outcome, then settle in the consumer thread."""
        retries_left = callback.attempts < self._config.callback_retries
        state = DELIVERED if ok else (RETRYING if retries_left else FAILED)
        if self._jobs is not None:
            try:
                self._jobs.callback_state(callback.correlation_id, state)
            except Exception as exc:  # the state is a report; the callback goes on
                log.warning("could not record callback %s: %r", callback.correlation_id, exc)
        self._call_soon(self._settle, channel, tag, service, callback, state)

    def _settle(self, channel, tag: int, service: str, callback: Callback, state: str) -> None:
        if channel is not self._channel:
            return  # its connection is gone: the broker gives the message to a worker again
        observe(metrics.count, metrics.callbacks_total, service, state)
        if state == RETRYING:
            self._retry(channel, tag, service, callback, callback.attempts + 1, state)
            return
        if state == FAILED:
            log.warning("callback for %s failed for good", callback.correlation_id)
        _settle_message(channel, tag, ACK)

    def _retry(
        self, channel, tag: int, service: str, callback: Callback, attempts: int, why: str
    ) -> None:
        """Publish the callback to the retry queue of its next delay; acknowledge it once
        the broker holds the copy."""
        delay = self._delays[min(callback.attempts, len(self._delays) - 1)]
        if why == "deferred":
            delay = self._delays[0]
            observe(metrics.count, metrics.callbacks_total, service, why)
        again = dataclasses.replace(callback, attempts=attempts)
        settled = functools.partial(self._retried, channel, tag, service)
        # Mandatory: a retry queue deleted since this worker connected would otherwise
        # swallow the copy, and the callback (its job saying "retrying") with it.
        self._publish(retry_queue(service, delay), again, settled, mandatory=True)

    def _retried(self, channel, tag: int, service: str, outcome: str) -> None:
        """Settle a callback on its retry copy's fate. RETURNED: the retry queue is gone;
        declare the queues again and give the message back, to be attempted once more
        now rather than lost."""
        if outcome == RETURNED and channel is self._channel:
            log.warning("a retry queue of %s was missing; declaring it again", queue_of(service))
            try:
                self._declare(channel, self._services[service], nowait=True)
            except Exception as exc:  # the channel is gone: the broker redelivers anyway
                log.debug("could not declare the callback queues again: %r", exc)
            outcome = NACK
        _settle_message(channel, tag, outcome)


def _well_formed(url: object, attempts: object, correlation_id: object, submitter: object) -> bool:
    """Whether a callback message's fields have the types this worker publishes."""
    strings = all(isinstance(field, str) for field in (url, correlation_id, submitter))
    return strings and type(attempts) is int


def _settle_message(channel, tag: int, outcome: str) -> None:
    try:
        if outcome in (ACK, RETURNED):
            channel.basic_ack(tag)
        elif outcome == NACK:
            channel.basic_reject(tag, requeue=True)
    except Exception as exc:  # its channel is gone: the broker redelivers it
        log.debug("could not settle a callback message: %r", exc)

"""Celery's consumer, serving ProxyMQ's request queues through ``workers.pipeline``.

``ForwardStep`` is the consumer bootstep that hosts the pipeline. Messages still come in
through Celery's own task consumer, so ``-Q``, the prefetch, ``add_consumer`` /
``cancel_consumer``, ``inspect active_queues`` and reconnects stay Celery's; the task
``proxymq.forward`` has a strategy (``workers.tasks``) that hands each message to the
pipeline instead of to Celery's request and tracing machinery.

``Consumer`` (selected with ``worker_consumer``) adds three things:

- messages Celery cannot run (undecodable, not a task, an unknown task, a task name that
  is no string) are dead-lettered by the pipeline, not acknowledged and lost, rejected
  unseen or, raising out of the event loop, stopping the worker;
- ``add_consumer`` only for the queues this worker was configured to serve;
- task events in bunches: Celery publishes its buffer on the event loop's next turn,
  i.e. up to three messages per request; here the buffer goes at most
  ``EVENTS_FLUSH_S`` after its first event (or at Celery's own 24-event limit), so under
  load one message carries many events.
"""

from __future__ import annotations

import contextlib
import logging
import time

import amqp
from celery import bootsteps
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.common import ignore_errors

from workers.pipeline import Pipeline

log = logging.getLogger(__name__)

EVENTS_FLUSH_S = 0.05
EVENTS_BUFFER = 256


class ForwardStep(bootsteps.StartStopStep):
    """Hosts the pipeline; started after Celery's task consumer, stopped before it."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs) -> None:
        super().__init__(c, **kwargs)
        c.pipeline = self.pipeline = Pipeline(c, c.controller.proxymq)

    def start(self, c) -> None:
        # Bodies as the broker holds them: py-amqp decodes a body to ``str`` by its
        # ``content_encoding`` when it can (auto_decode), so a malformed message that
        # says ``utf-8`` would reach the pipeline as text, neither a request nor
        # publishable to the dead-letter queue as it came. Kombu decodes what it needs
        # (a protocol-1 body) itself. Set before consuming starts (Celery's event loop).
        c.task_consumer.channel.auto_decode = False
        self.pipeline.open(c.connection)
        if c.event_dispatcher is not None:
            # Celery sends its event buffer every 24 events; three per request, under
            # load that is a message every eight requests. The 50 ms timer
            # (``on_send_event_buffered``) bounds the wait instead.
            c.event_dispatcher.buffer_limit = EVENTS_BUFFER
        # The task consumer's prefetch is -c; batches need more, and a concurrency cap
        # below -c less (``Pipeline.cut_prefetch``; under ``auto`` the cut then follows
        # the limit).
        change = self.pipeline.prefetch - self.pipeline.cut_prefetch()
        if change > 0:
            c.qos.increment_eventually(change)
            c.qos.update()
        elif change < 0:
            c.qos.decrement_eventually(-change)
            c.qos.update()

    def stop(self, c) -> None:
        self._finish(c)

    def shutdown(self, c) -> None:
        self._finish(c)
        c.controller.proxymq.health.stop()
        for flow in c.controller.proxymq.flows.values():
            flow.close()

    def _finish(self, c) -> None:
        """Warm shutdown or a lost connection: stop consuming, and settle what is in
        flight while the connection lasts."""
        _settle(c, self.pipeline)
        self.pipeline.close()


def _settle(c, pipeline: Pipeline) -> None:
    """Stop consuming, and settle what is in flight while the connection lasts."""
    if c.task_consumer is not None:
        ignore_errors(c.connection, c.task_consumer.cancel)
    pipeline.stop_taking()
    if c.connection is not None and c.connection.connected:
        timeout = max(s.downstream_timeout for s in pipeline.services.values())
        pipeline.settle_outstanding(c.connection, timeout)


# Channel errors a broker node going away causes for a moment: a worker reconnecting to
# another node of a cluster got 404 binding its remote-control queue (the broker was still
# removing the dead node's copy) and, before that, 405 declaring it (the old connection
# still held it). Any other channel error (403 permissions, 406 a queue declared with
# other arguments) is a configuration that retrying cannot mend: it still stops the worker.
TRANSIENT_CHANNEL_ERRORS = (amqp.exceptions.NotFound, amqp.exceptions.ResourceLocked)
CHANNEL_ERROR_MAX_BACKOFF_S = 10.0
CHANNEL_ERROR_QUIET_S = 60.0


class Consumer(CeleryConsumer):
    _events_flush_at = 0.0  # monotonic time of the scheduled flush; 0.0: none
    _channel_errors_streak = 0  # restarts for a channel error in a row (``_back_off...``)
    _channel_error_at = 0.0  # monotonic time of the last

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # With ``broker_channel_error_retry`` Celery restarts the consumer (reconnects,
        # declares again) on these, as on a lost connection, instead of exiting.
        self.channel_errors = TRANSIENT_CHANNEL_ERRORS

    def on_connection_error_after_connected(self, exc) -> None:
        """A channel error leaves the connection up, but Celery drops it here, before
        ``ForwardStep.stop`` could settle the calls in flight: the broker would redeliver
        their requests and the restarted consumer make each call again while the first
        still runs. Settle them first, while the connection lasts, as a warm shutdown does."""
        transient = isinstance(exc, TRANSIENT_CHANNEL_ERRORS)
        pipeline = getattr(self, "pipeline", None)
        if transient and pipeline is not None:
            try:
                _settle(self, pipeline)
            except Exception:  # the restart goes on; at worst a call is made again
                log.exception("could not settle the calls in flight before restarting")
        super().on_connection_error_after_connected(exc)
        if transient:
            self._back_off_channel_error()

    def _back_off_channel_error(self) -> None:
        """The broker is up, so Celery reconnects at once: a 404/405 that does not clear
        (a classic queue whose node is gone for good, a queue another connection holds)
        would restart the consumer several times a second, a connection and a logged
        traceback each, for as long as the worker lives. Back off exponentially (up to
        ``CHANNEL_ERROR_MAX_BACKOFF_S``); a streak ends after a quiet minute."""
        now = time.monotonic()
        if now - self._channel_error_at > CHANNEL_ERROR_QUIET_S:
            self._channel_errors_streak = 0
        self._channel_error_at = now
        delay = min(CHANNEL_ERROR_MAX_BACKOFF_S, 0.5 * 2**self._channel_errors_streak)
        self._channel_errors_streak += 1
        log.warning("consumer: a channel error again; reconnecting in %.1f s", delay)
        time.sleep(delay)

    class Blueprint(CeleryConsumer.Blueprint):
        """Celery's consumer steps without ``DelayedDelivery``.

        Celery adds that step when a served queue is a quorum queue, for tasks sent with
        a countdown or an ETA; nothing sends ProxyMQ's requests so. The step connects to
        every URL of a ``;`` broker list in turn before the consumer starts consuming,
        retrying a node that is down for about 15 s: seen here to stop a worker that lost
        its node from consuming on the next one for that long.
        """

        default_steps = [
            step
            for step in CeleryConsumer.Blueprint.default_steps
            if not step.endswith(":DelayedDelivery")
        ]

    # -- messages Celery cannot run ------------------------------------------------------

    def create_task_handler(self, *args, **kwargs):
        """Celery's handler of every message, made total: before it hands a message to a
        task's strategy it looks the task's name up in a dict, and a name that is no
        string (``{"task": [1]}`` as a protocol-1 JSON body, or a list in the ``task``
        header) raises ``TypeError`` out of the event loop, which stops the worker, and
        the next worker, and the next. Such a message is dead-lettered instead."""
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message) -> None:
            try:
                handle(message)
            except Exception as exc:  # raised before the message reached the pipeline
                self.pipeline.reject(message, f"invalid task message: {exc}")

        return on_task_received

    def on_decode_error(self, message, exc) -> None:
        self.pipeline.reject(message, f"cannot be decoded: {exc}")

    def on_unknown_message(self, body, message) -> None:
        self.pipeline.reject(message, "not a Celery task message")

    def on_unknown_task(self, body, message, exc) -> None:
        self.pipeline.reject(message, f"unknown task: {exc}")

    def on_invalid_task(self, body, message, exc) -> None:
        self.pipeline.reject(message, f"invalid task message: {exc}")

    def add_task_queue(self, queue, *args, **kwargs):
        """Remote control's ``add_consumer``: only a queue this worker has a downstream
        for (another would have its every message dead-lettered)."""
        if queue not in self.pipeline.services:
            log.warning("add_consumer %r refused: this worker does not serve it", queue)
            return None
        if self.pipeline.paused:
            # Every call thread relays a stream (``workers.prefetch``): Celery's way would
            # consume all the queues again now. The queue joins them, consumed with the
            # others when a stream ends.
            queues = self.app.amqp.queues
            self.task_consumer.add_queue(queues.select_add(queues[queue]))
            log.info("add_consumer %r: consumed once a stream ends", queue)
            return None
        return super().add_task_queue(queue, *args, **kwargs)

    # -- task events in bunches ------------------------------------------------------------

    def on_send_event_buffered(self) -> None:
        """Called in any thread when a task event is buffered: flush later, not now.

        A flush long overdue counts as none, so one that a reconnect dropped from the
        timer delays events until the next one arrives but never stops them for good.
        """
        if not self.hub:
            return
        now = time.monotonic()
        if self._events_flush_at and now < self._events_flush_at + EVENTS_FLUSH_S:
            return
        self._events_flush_at = now + EVENTS_FLUSH_S
        self.hub.call_soon(self._schedule_events_flush)  # thread-safe; the timer is not

    def _schedule_events_flush(self) -> None:
        delay = max(0.0, self._events_flush_at - time.monotonic())
        self.hub.call_later(delay, self._flush_due_events)

    def _flush_due_events(self) -> None:
        # Cleared before flushing: an event buffered meanwhile either goes in this flush
        # or schedules the next one.
        self._events_flush_at = 0.0
        self._flush_buffered_events()

    def _flush_buffered_events(self) -> None:
        if self.event_dispatcher is not None:
            self.event_dispatcher.flush()

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._flush_buffered_events()  # what is still waiting for its timer
        super().shutdown()

    def on_close(self) -> None:
        # A new connection gets a new event dispatcher, which keeps only what could not
        # be sent, not the bunch in progress: send it (or have it kept) first.
        with contextlib.suppress(Exception):
            self._flush_buffered_events()
        super().on_close()

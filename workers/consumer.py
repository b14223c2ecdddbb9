"""Celery's consumer, with messages it cannot run dead-lettered instead of dropped, and
task events sent in bunches.

Celery acknowledges a message it cannot decode and rejects one naming an unknown task or
malformed as a task; either way the message is gone and its client waits for nothing.
Here such a message goes to ``<queue>.dead`` as it was, and a client whose reply queue
the message names gets 502 ``poison`` at once. (Selected with ``worker_consumer``.)

Task events: Celery buffers them and publishes the buffer as one ``task.multi`` message
on the event loop's next turn, i.e. right after each request is received and again after
it succeeds: two messages per request, the first one while the request's thread waits
for the GIL to start. Here the buffer is published at most ``EVENTS_FLUSH_S`` after its
first event (or at Celery's own 24-event limit), so under load one message carries many
events; Flower and celery-exporter see them a few milliseconds later.
"""

from __future__ import annotations

import contextlib
import logging
import time

from celery.worker.consumer import Consumer as CeleryConsumer

from proxymq.config import QUEUE_SUFFIX
from workers import poison, runtime

log = logging.getLogger(__name__)

EVENTS_FLUSH_S = 0.05


class Consumer(CeleryConsumer):
    _events_flush_at = 0.0  # monotonic time of the scheduled flush; 0.0: none

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
        self._flush_events()

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._flush_events()  # what is still waiting for its timer
        super().shutdown()

    def on_close(self) -> None:
        # A new connection gets a new event dispatcher, which keeps only what could not
        # be sent, not the bunch in progress: send it (or have it kept) first.
        with contextlib.suppress(Exception):
            self._flush_events()
        super().on_close()

    def on_decode_error(self, message, exc) -> None:
        dead_letter_message(message, f"cannot be decoded: {exc}")

    def on_unknown_message(self, body, message) -> None:
        dead_letter_message(message, "not a Celery task message")

    def on_unknown_task(self, body, message, exc) -> None:
        dead_letter_message(message, f"unknown task: {exc}")

    def on_invalid_task(self, body, message, exc) -> None:
        dead_letter_message(message, f"invalid task message: {exc}")


def dead_letter_message(message, reason: str) -> None:
    queue = (message.delivery_info or {}).get("routing_key") or ""
    service = queue.removesuffix(QUEUE_SUFFIX)
    state = runtime.current()
    properties = {
        key: message.properties[key]
        for key in ("correlation_id", "reply_to", "content_type", "content_encoding")
        if message.properties.get(key)
    }
    try:
        poison.dead_letter(
            state.publisher, service, queue, message.body, message.headers or {}, properties, reason
        )
        reply_to, correlation_id = properties.get("reply_to"), properties.get("correlation_id")
        if reply_to and correlation_id:
            state.publisher.reply(reply_to, correlation_id, poison.poison_reply(1))
    except Exception:
        # Leave it unacknowledged: it comes back when this connection closes.
        log.exception("could not dead-letter a message of %s", queue)
        return
    message.ack()

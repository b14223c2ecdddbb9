"""The gateway process's link to RabbitMQ: publish requests, receive replies, reconnect.

One AMQP connection and one channel per gateway process. A single greenlet does all the
reading (replies, publisher confirms, returns); request greenlets only write, under a
lock, and then wait for their own confirm. Confirms of many requests are thus in flight
at once on one channel, instead of each publish holding the channel until the broker
answers (which is what py-amqp's ``confirm_publish`` option does).

Kombu makes the connection (URL parsing, transports); the request path then talks to
py-amqp's channel directly, because Kombu's ``Producer`` waits for each confirm in turn
and has no hook for basic.return.
"""

from __future__ import annotations

import contextlib
import logging
import os

import amqp
import gevent
import kombu
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore

from gateway.replies import ReplyRouter

log = logging.getLogger(__name__)

ACK, RETURNED, NACK = "ack", "returned", "nack"


class BrokerUnavailable(Exception):
    """The connection to RabbitMQ is down; requests fail fast until it is back."""


class BrokerLink:
    """Publishes requests with confirms and routes the replies to their waiters."""

    def __init__(self, url: str, heartbeat: int = 20, reconnect_delay: float = 1.0) -> None:
        self._url = url
        self._heartbeat = heartbeat
        self._reconnect_delay = reconnect_delay
        self._write_lock = Semaphore()
        self._ready = Event()
        self._pid: int | None = None
        self._connection: kombu.Connection | None = None
        self._channel: amqp.Channel | None = None
        self._tag = 0
        self._confirms: dict[int, tuple[str, AsyncResult]] = {}
        self._returned: set[str] = set()
        self.replies = ReplyRouter()
        self.reply_queue: str | None = None
        # Queues that confirmed a publish: they exist, so their names are safe metric
        # labels (a name any client can invent is not).
        self.known_queues: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; idempotent, and safe to call after a fork."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        gevent.spawn(self._run)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def _run(self) -> None:
        while True:
            try:
                self._connect()
                beat = gevent.spawn(self._beat)
                try:
                    self._read_forever()
                finally:
                    beat.kill()
            except Exception as exc:
                log.warning("broker connection lost: %r; reconnecting", exc)
            finally:
                self._teardown()
            gevent.sleep(self._reconnect_delay)

    def _connect(self) -> None:
        connection = kombu.Connection(self._url, heartbeat=self._heartbeat, connect_timeout=5)
        connection.connect()
        self._connection = connection
        channel = connection.connection.channel()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        queue, _, _ = channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        channel.basic_consume(queue=queue, no_ack=True, callback=self._on_reply)
        self._tag = 0
        self.reply_queue = queue
        self._channel = channel
        self._ready.set()
        log.info("connected to the broker; reply queue %s", queue)

    def _read_forever(self) -> None:
        connection = self._connection.connection
        while True:
            connection.drain_events()

    def _beat(self) -> None:
        """Send heartbeats and notice a silent broker (the reader alone would wait forever)."""
        connection = self._connection.connection
        while True:
            gevent.sleep(self._heartbeat / 2)
            try:
                with self._write_lock:
                    connection.heartbeat_tick(rate=2)
            except Exception as exc:
                log.warning("broker heartbeat failed: %r", exc)
                connection.collect()
                return

    def _teardown(self) -> None:
        self._ready.clear()
        self._channel = None
        self.reply_queue = None
        confirms, self._confirms = self._confirms, {}
        self._returned.clear()
        error = BrokerUnavailable("the connection to the broker was lost")
        for _, result in confirms.values():
            result.set_exception(error)
        self.replies.fail_all(error)
        if self._connection is not None:
            # The socket may already be gone; there is nothing left to release then.
            with contextlib.suppress(Exception):
                self._connection.collect()
            self._connection = None

    # -- publishing ---------------------------------------------------------------------

    def publish(
        self,
        routing_key: str,
        body: bytes,
        headers: dict,
        properties: dict,
        timeout: float,
        reply: bool = False,
    ) -> str:
        """Publish one message (mandatory, confirmed); return ACK, RETURNED or NACK.

        RETURNED means no queue took the message (the broker sends basic.return before the
        ack); NACK means the queue refused it (a full queue with ``reject-publish``). With
        ``reply``, the message names this process's reply queue, read under the lock so it
        is the queue of the channel that carries the message. Raises ``BrokerUnavailable``
        at once while disconnected, or when the broker stops reading (a resource alarm) for
        longer than ``timeout``; ``gevent.Timeout`` when it does not confirm in time.
        """
        correlation_id = properties["correlation_id"]
        message = amqp.Message(body, application_headers=headers, **properties)
        result = AsyncResult()
        if not self._write_lock.acquire(timeout=timeout):
            raise BrokerUnavailable("the broker is not accepting messages")
        try:
            tag = self._write(routing_key, message, correlation_id, result, timeout, reply)
        finally:
            self._write_lock.release()
        try:
            outcome = result.get(timeout=timeout)
        finally:
            self._confirms.pop(tag, None)
            self._returned.discard(correlation_id)
        if outcome == ACK:
            self.known_queues.add(routing_key)
        return outcome

    def _write(self, routing_key, message, correlation_id, result, timeout, reply) -> int:
        """Under the write lock: number the publish for its confirm, write it, bounded."""
        channel = self._channel
        if channel is None:
            raise BrokerUnavailable("not connected to the broker")
        if reply:
            message.properties["reply_to"] = self.reply_queue
        self._tag += 1
        tag = self._tag
        self._confirms[tag] = (correlation_id, result)
        try:
            with gevent.Timeout(timeout):
                channel.basic_publish(message, "", routing_key, mandatory=True)
        except BaseException as exc:
            # Half a frame may be on the wire and the delivery tags no longer match the
            # broker's count: this connection cannot be used any more.
            self._confirms.pop(tag, None)
            self._break()
            if isinstance(exc, Exception | gevent.Timeout):
                raise BrokerUnavailable(f"publish failed: {exc!r}") from exc
            raise
        return tag

    def _break(self) -> None:
        """Close the socket under the reader, which then tears down and reconnects."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.connection.collect()

    def _settle(self, delivery_tag: int, multiple: bool, outcome: str) -> None:
        tags = [t for t in self._confirms if t <= delivery_tag] if multiple else [delivery_tag]
        for tag in tags:
            entry = self._confirms.pop(tag, None)
            if entry is None:
                continue
            correlation_id, result = entry
            if correlation_id in self._returned:
                self._returned.discard(correlation_id)
                result.set(RETURNED)
            else:
                result.set(outcome)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, ACK)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, NACK)

    def _on_return(self, exc, exchange, routing_key, message) -> None:
        self._returned.add(message.properties.get("correlation_id"))

    # -- replies ------------------------------------------------------------------------

    def _on_reply(self, message: amqp.Message) -> None:
        self.replies.deliver(message.properties.get("correlation_id"), message.body)

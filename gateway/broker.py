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
import time
import uuid
from urllib.parse import urlsplit

import amqp
import gevent
import kombu
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore

from gateway.liveness import WorkerWatch
from gateway.refusals import Refusals, StillRefused
from gateway.replies import ReplyRouter
from gateway.service_state import ServiceStates
from gateway.streams import ABORTED, ENDED, WORKER_GONE, Stream
from proxymq.confirms import ACK, LOST, NACK, RETURNED, ConfirmTracker, Ticket
from proxymq.envelope import HEAD, StreamPart, cancel_headers, is_cancel_queue
from proxymq.parsers import broker_urls

log = logging.getLogger(__name__)

DEPTH_TIMEOUT = 2.0  # seconds for the passive declare that tells a full queue
PROBE_TIMEOUT = 2.0  # seconds for a stream's worker probe to be confirmed or returned


class BrokerUnavailable(Exception):
    """The connection to RabbitMQ is down; requests fail fast until it is back."""


class BrokerLink:
    """Publishes requests with confirms and routes the replies to their waiters."""

    def __init__(
        self,
        url: str,
        heartbeat: int = 20,
        reconnect_delay: float = 1.0,
        ssl: list[dict] | None = None,
        reply_users: frozenset[str] | None = None,
        connect_timeout: float = 5,
        stream_buffer_bytes: int = 1024 * 1024,
    ) -> None:
        """``ssl``, for ``amqps://``, is one ``BrokerTLS.ssl_options(host)`` per URL of
        the list, in its order: each node is checked against its own host name (without
        them Kombu's TLS would check no host name at all). ``reply_users`` is
        ``PROXYMQ_REPLY_USERS``.

        ``url`` may be a ``;``-separated list (a cluster's nodes): each connect tries
        them in turn, starting with the one after the node last connected to (the one
        whose connection was lost is likely the one that is gone), and sleeps
        ``reconnect_delay`` only once every node has refused."""
        self._urls = broker_urls(url)
        if ssl is not None and len(ssl) != len(self._urls):
            raise ValueError(f"{len(ssl)} ssl options for {len(self._urls)} broker URLs")
        self._next = 0
        self._current: int | None = None  # index in _urls of the node connected to
        self._connect_timeout = connect_timeout
        self.node: str | None = None  # "host:port" of the node connected to
        self._ssl = ssl
        self._reply_users = reply_users
        self._heartbeat = heartbeat
        self._reconnect_delay = reconnect_delay
        self._write_lock = Semaphore()
        self._ready = Event()
        self._pid: int | None = None
        self._connection: kombu.Connection | None = None
        self._confirms: ConfirmTracker | None = None
        self.replies = ReplyRouter(stream_buffer_bytes)
        self.reply_queue: str | None = None
        # Queues that confirmed a publish: they exist, so their names are safe metric
        # labels (a name any client can invent is not). So are those a worker announced.
        self.known_queues: set[str] = set()
        self.status = ServiceStates(reply_users, self.known_queues)
        self._refusals = Refusals(self._depth)
        self._watch = WorkerWatch(self.probe, self.replies.open_streams)

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
            connected_at = None
            try:
                self._connect()
                connected_at = time.monotonic()
                beat = gevent.spawn(self._beat)
                try:
                    self._read_forever()
                finally:
                    beat.kill()
            except Exception as exc:
                log.warning("broker connection lost: %r; reconnecting", exc)
            finally:
                self._teardown()
            # A connection that served a while is replaced at once (by another node of a
            # cluster, if this one is gone); one lost as soon as it was made, or none made,
            # waits first, so a broker refusing us is not hammered.
            if connected_at is None or time.monotonic() - connected_at < self._reconnect_delay:
                gevent.sleep(self._reconnect_delay)

    def _connect(self) -> None:
        connection = self._connect_any()
        self._connection = connection
        channel = connection.connection.channel()  # replies; the tracker has its own
        confirms = ConfirmTracker(connection.connection)
        queue, _, _ = channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        channel.basic_consume(queue=queue, no_ack=True, callback=self._on_reply)
        self.status.listen(connection.connection)
        self.reply_queue = queue
        self._confirms = confirms
        self._ready.set()
        log.info("connected to the broker at %s; reply queue %s", self.node, queue)

    def _connect_any(self) -> kombu.Connection:
        """A connection to the first node of the list, from ``_next`` on, that accepts.

        A node that is down refuses at once (or within ``connect_timeout`` when its
        host does not answer), so a cluster that lost a node is reached again within
        one turn of the list.
        """
        error: Exception | None = None
        for step in range(len(self._urls)):
            index = (self._next + step) % len(self._urls)
            connection = kombu.Connection(
                self._urls[index],
                heartbeat=self._heartbeat,
                connect_timeout=self._connect_timeout,
                ssl=self._ssl[index] if self._ssl else False,
            )
            try:
                connection.connect()
            except Exception as exc:
                error = exc
                with contextlib.suppress(Exception):
                    connection.collect()
                if len(self._urls) > 1:
                    log.warning("broker node %s refused: %r", self._address(index), exc)
                continue
            self._next = (index + 1) % len(self._urls)
            self._current = index
            self.node = self._address(index)
            return connection
        raise error

    def _address(self, index: int) -> str:
        parts = urlsplit(self._urls[index])
        return f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"

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
        confirms, self._confirms = self._confirms, None
        self.reply_queue = None
        self.node = None
        self._current = None
        if confirms is not None:
            confirms.lose_all()
        self.replies.fail_all(BrokerUnavailable("the connection to the broker was lost"))
        if self._connection is not None:
            # The socket may already be gone; there is nothing left to release then.
            with contextlib.suppress(Exception):
                self._connection.collect()
            self._connection = None

    # -- publishing ---------------------------------------------------------------------

    def publish(
        self, routing_key: str, body: bytes, headers: dict, properties: dict, timeout: float
    ) -> str:
        """Publish one message (mandatory, confirmed); return ACK, RETURNED or NACK.

        RETURNED means no queue took the message; NACK means the queue is full (at its
        length limit with ``reject-publish``). A nack from a cluster failing over is
        retried within ``timeout`` (``gateway.refusals``). A message naming a reply
        queue must name this process's current one: after a reconnect its reply could
        not arrive. Raises ``BrokerUnavailable`` at once while disconnected, when the
        broker stops reading (a resource alarm) for longer than ``timeout``, or when
        the nacks of a queue that is not full persist; ``gevent.Timeout`` when it does
        not confirm in time.
        """
        message = amqp.Message(body, application_headers=headers, **properties)
        give_up = time.monotonic() + timeout
        outcome = self._publish(routing_key, message, properties, timeout)
        if outcome == NACK:  # all that a nack adds (gateway.refusals)
            outcome = self._after_nack(routing_key, message, properties, give_up)
        if outcome == ACK:
            self.known_queues.add(routing_key)
        return outcome

    def _publish(
        self,
        routing_key: str,
        message: amqp.Message,
        properties: dict,
        timeout: float,
        fresh_since: float | None = None,
    ) -> str:
        """One publish and its confirm; with ``fresh_since``, on a channel opened then
        or later."""
        result = AsyncResult()
        if not self._write_lock.acquire(timeout=timeout):
            raise BrokerUnavailable("the broker is not accepting messages")
        try:
            confirms = self._confirms
            reply_to = properties.get("reply_to")
            if confirms is None or (reply_to is not None and reply_to != self.reply_queue):
                raise BrokerUnavailable("not connected to the broker")
            if fresh_since is not None:
                confirms.renew_unless_opened_since(fresh_since)
            ticket = self._write(confirms, routing_key, message, result.set, timeout)
        finally:
            self._write_lock.release()
        try:
            outcome = result.get(timeout=timeout)
        finally:
            confirms.forget(ticket)
        if outcome == LOST:
            raise BrokerUnavailable("the connection to the broker was lost")
        return outcome

    def _after_nack(
        self, routing_key: str, message: amqp.Message, properties: dict, give_up: float
    ) -> str:
        def republish(fresh_since: float | None) -> str:
            remaining = max(0.0, give_up - time.monotonic())
            return self._publish(routing_key, message, properties, remaining, fresh_since)

        try:
            return self._refusals.after_nack(routing_key, republish, give_up)
        except StillRefused as exc:
            raise BrokerUnavailable(str(exc)) from None

    def _depth(self, queue: str) -> int | None:
        """The queue's message count by a passive declare, on a connection of its own
        to the node the link is on: a declare's answer on the link's connection would
        reach its reader, and a refusal (404) would close the channel under it. None
        when the broker does not say."""
        connection = self._side_connection(DEPTH_TIMEOUT)
        if connection is None:
            return None
        try:
            with gevent.Timeout(DEPTH_TIMEOUT):
                connection.connect()
                _, count, _ = connection.channel().queue_declare(queue=queue, passive=True)
                return count
        except (Exception, gevent.Timeout) as exc:
            log.info("could not count the messages of %s: %r", queue, exc)
            return None
        finally:
            with contextlib.suppress(Exception):
                connection.release()

    def _side_connection(self, timeout: float) -> kombu.Connection | None:
        """A connection (not yet made) of its own to the node the link is on, for
        declares whose answers must not reach the link's reader; None unconnected."""
        index = self._current
        if index is None:
            return None
        return kombu.Connection(
            self._urls[index],
            heartbeat=0,
            connect_timeout=timeout,
            ssl=self._ssl[index] if self._ssl else False,
        )

    def _write(self, confirms, routing_key, message, settled, timeout) -> Ticket:
        """Under the write lock: publish, bounded in time."""
        try:
            with gevent.Timeout(timeout):
                return confirms.publish(routing_key, message, settled, mandatory=True)
        except BaseException as exc:
            # Half a frame may be on the wire and the delivery tags no longer match the
            # broker's count: this connection cannot be used any more.
            self._break()
            if isinstance(exc, Exception | gevent.Timeout):
                raise BrokerUnavailable(f"publish failed: {exc!r}") from exc
            raise

    def _break(self) -> None:
        """Close the socket under the reader, which then tears down and reconnects."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.connection.collect()

    # -- replies ------------------------------------------------------------------------

    def _on_reply(self, message: amqp.Message) -> None:
        """Route a reply to its waiter. With ``PROXYMQ_REPLY_USERS``, only from those
        broker users: anyone who can read a request queue learns a request's reply
        queue and correlation id, but ``user_id`` is checked by the broker against the
        publisher's own login, so it cannot be forged."""
        properties = message.properties
        user = properties.get("user_id")
        if self._reply_users is not None and user not in self._reply_users:
            log.warning("dropped a reply from broker user %r: not in PROXYMQ_REPLY_USERS", user)
            return
        correlation_id = properties.get("correlation_id")
        part = StreamPart.of(properties.get("application_headers"))
        if part is None:
            self.replies.deliver(correlation_id, message.body)
        elif part.kind != HEAD:
            self.replies.feed(correlation_id, part, message.body)
        elif self.replies.start_stream(correlation_id, message.body, part):
            self._watch.watch()  # while it is open, is its worker still there?
        else:  # nobody reads it: stop the worker
            self.cancel(part.cancel_to, correlation_id, part.stream_id)

    def end_stream(self, correlation_id: str, stream: Stream) -> None:
        """A stream's answer is over; unless it ended (or the worker stopped it, or is
        gone), ask the worker to stop calling the downstream."""
        self.replies.end_stream(correlation_id)
        if stream.state not in (ENDED, ABORTED, WORKER_GONE):
            self.cancel(stream.cancel_to, correlation_id, stream.id)

    def probe(self, queue: str) -> bool | None:
        """Whether a worker's cancel queue is there (``gateway.liveness``): an empty
        message naming no stream, mandatory and confirmed. False when the broker returns
        it (no such queue), True when it confirms it, None when nothing tells."""
        if not is_cancel_queue(queue):
            return None
        # A correlation id of its own: the tracker tells a return by it.
        properties = {"correlation_id": f"probe-{uuid.uuid4()}"}
        if self._connection is not None:
            properties["user_id"] = self._connection.userid
        try:
            outcome = self._publish(queue, amqp.Message(b"", **properties), {}, PROBE_TIMEOUT)
        except (BrokerUnavailable, gevent.Timeout):
            return None
        return {ACK: True, RETURNED: False}.get(outcome)

    def cancel(self, queue: str, correlation_id: str | None, stream_id: str) -> None:
        """Send a stream's cancel to the worker's cancel queue; best effort (a worker
        that is gone has nothing left to stop), so not waited for.

        Only to a cancel queue's name, whatever the head said, and as this connection's
        broker user (``user_id``, which RabbitMQ checks), so a worker can tell a
        gateway's cancel from anyone else's (``PROXYMQ_CANCEL_USERS``)."""
        confirms = self._confirms
        if confirms is None or not is_cancel_queue(queue):
            return
        if not self._write_lock.acquire(timeout=1):
            return
        try:
            message = amqp.Message(
                b"",
                correlation_id=correlation_id,
                user_id=self._connection.userid,
                application_headers=cancel_headers(stream_id),
            )
            confirms.publish(queue, message, _ignore)
        except Exception as exc:  # half a frame may be out: the connection is done
            log.warning("could not send a stream's cancel: %r", exc)
            self._break()
        finally:
            self._write_lock.release()


def _ignore(_outcome: str) -> None:
    pass

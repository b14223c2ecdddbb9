"""Everything a worker publishes: replies, counted redeliveries, dead letters.

Through a Kombu producer pool with publisher confirms: a task returns (and Celery
acknowledges its request, acks late) only after the broker holds what it published, so a
worker killed in between redelivers the request rather than losing its answer.

A batch's replies go together (``reply_many``): all published, then one wait for all
their confirms, instead of a round trip to the broker per reply. Kombu's producer waits
for each confirm in turn, so that path talks to py-amqp's channel directly (as the
gateway does), on connections no other code publishes on.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time

import amqp
import kombu
from kombu.pools import ProducerPool

from proxymq.envelope import CONTENT_ENCODING, CONTENT_TYPE, ReplyEnvelope, encode_reply

log = logging.getLogger(__name__)

RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5}
CONFIRM_TIMEOUT_S = 10.0
# Reply connections have no heartbeats; one idle longer than this may have been dropped
# silently on the way (a NAT, a firewall), so it is replaced rather than trusted.
IDLE_LIMIT_S = 30.0


def _reply_properties(correlation_id: str) -> dict:
    return {
        "correlation_id": correlation_id,
        "content_type": CONTENT_TYPE,
        "content_encoding": CONTENT_ENCODING,
        "delivery_mode": 1,
    }


class ConfirmingChannel:
    """A connection with one channel in confirm mode that only this object publishes on,
    so the broker's delivery tags count exactly its publishes: publish many, wait once.
    Not thread-safe: one user at a time (``Publisher`` hands them out)."""

    def __init__(self, broker_url: str) -> None:
        self._connection = kombu.Connection(broker_url, connect_timeout=5)
        try:
            self._connection.connect()
            self._channel = self._connection.connection.channel()
            self._channel.confirm_select()
        except BaseException:
            self.drop()
            raise
        self.last_used = time.monotonic()
        self._channel.events["basic_ack"].add(self._on_ack)
        self._channel.events["basic_nack"].add(self._on_nack)
        self._tag = 0
        self._pending: set[int] = set()
        self._nacked: set[int] = set()

    def publish_all(self, messages: list[tuple[str, amqp.Message]], timeout: float) -> list[bool]:
        """Publish every ``(routing_key, message)``; True for each the broker confirmed,
        False for each it refused. Raises on a connection failure or no confirm in time."""
        first = self._tag + 1
        self._pending, self._nacked = set(), set()
        for routing_key, message in messages:
            # Pending before it is sent: py-amqp's basic_publish reads incoming frames
            # (to notice connection.blocked), so confirms can arrive while publishing.
            self._tag += 1
            self._pending.add(self._tag)
            self._channel.basic_publish(
                message, exchange="", routing_key=routing_key, timeout=timeout
            )
        give_up = time.monotonic() + timeout
        while self._pending:
            left = give_up - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self._pending)} confirms not received in {timeout} s")
            self._connection.connection.drain_events(timeout=left)
        self.last_used = time.monotonic()
        return [tag not in self._nacked for tag in range(first, self._tag + 1)]

    def _settle(self, delivery_tag: int, multiple: bool) -> set[int]:
        done = {t for t in self._pending if t <= delivery_tag} if multiple else {delivery_tag}
        self._pending -= done
        return done

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacked |= self._settle(delivery_tag, multiple)

    def drop(self) -> None:
        """Let go of the socket without AMQP's closing handshake: a broker that stopped
        answering is why this is called, and the handshake would wait for it."""
        with contextlib.suppress(Exception):
            self._connection.collect()


class Publisher:
    """Thread-safe: each publishing thread borrows a producer (and its connection)."""

    def __init__(self, broker_url: str, pool_size: int) -> None:
        self._broker_url = broker_url
        connection = kombu.Connection(broker_url, transport_options={"confirm_publish": True})
        self._producers = ProducerPool(connection.Pool(limit=pool_size), limit=pool_size)
        self._confirming: queue.LifoQueue[ConfirmingChannel] = queue.LifoQueue()

    def publish(
        self, routing_key: str, body: bytes, headers: dict, properties: dict, declare=()
    ) -> None:
        """Publish to the default exchange (routing by queue name), confirmed.

        ``properties`` are AMQP properties as the envelope module makes them; Kombu wants
        the expiration in seconds rather than AMQP's milliseconds.
        """
        if "expiration" in properties:
            properties = {**properties, "expiration": int(properties["expiration"]) / 1000}
        with self._producers.acquire(block=True) as producer:
            producer.publish(
                body,
                exchange="",
                routing_key=routing_key,
                headers=headers,
                declare=list(declare),
                retry=True,
                retry_policy=RETRY_POLICY,
                **properties,
            )

    def reply(self, reply_to: str, correlation_id: str, reply: ReplyEnvelope) -> None:
        """Publish ``reply``; a reply queue that is gone (its gateway stopped) drops it."""
        self.publish(reply_to, encode_reply(reply), {}, _reply_properties(correlation_id))

    def reply_many(self, replies: list[tuple[str, str, ReplyEnvelope]]) -> list[bool]:
        """Publish ``(reply_to, correlation_id, reply)`` triples with one wait for all
        their confirms; True for each the broker holds. A connection that fails is
        dropped and the whole list tried once more on a fresh one (a reply published
        twice is harmless: the gateway takes the first and drops the other)."""
        messages = [
            (reply_to, amqp.Message(encode_reply(reply), **_reply_properties(correlation_id)))
            for reply_to, correlation_id, reply in replies
        ]
        try:
            return self._publish_confirmed(messages)
        except Exception as exc:
            log.warning("reply connection failed (%r); retrying on a new one", exc)
            return self._publish_confirmed(messages)

    def _publish_confirmed(self, messages: list[tuple[str, amqp.Message]]) -> list[bool]:
        channel = self._take_confirming()
        try:
            confirmed = channel.publish_all(messages, CONFIRM_TIMEOUT_S)
        except BaseException:
            channel.drop()  # its delivery tags no longer match the broker's count
            raise
        self._confirming.put(channel)
        return confirmed

    def _take_confirming(self) -> ConfirmingChannel:
        """The most recently used reply connection, unless idle too long; else a new one."""
        while True:
            try:
                channel = self._confirming.get_nowait()
            except queue.Empty:
                return ConfirmingChannel(self._broker_url)
            if time.monotonic() - channel.last_used < IDLE_LIMIT_S:
                return channel
            channel.drop()

    def close(self) -> None:
        self._producers.force_close_all()
        while not self._confirming.empty():
            self._confirming.get_nowait().drop()

"""Everything a worker publishes: replies, requests published again, dead letters.

On confirm-mode channels (``proxymq.confirms``) of the Celery consumer's own
connection, from the consumer thread only. The consumer thread already reads that
connection (Celery's event loop), so the broker's confirms arrive there too, and each
message is acknowledged the moment the broker holds what answered it (acks late): no
thread waits for a confirm, no second connection, and a worker killed in between leaves
the request unacknowledged, to be delivered again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import amqp

from proxymq.config import ServiceConfig
from proxymq.confirms import ConfirmTracker, Settled
from proxymq.envelope import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    ReplyEnvelope,
    cancelled_stream,
    encode_reply,
    new_cancel_queue,
)

DEAD_SUFFIX = ".dead"

log = logging.getLogger(__name__)


def properties_of(message) -> dict:
    """A received message's AMQP properties, to publish it again as it came (its headers
    travel separately). Without ``user_id``: the broker checks that property against the
    publishing connection's user, and the worker is now the publisher."""
    return {
        k: v for k, v in message.properties.items() if k not in ("application_headers", "user_id")
    }


class Publisher:
    def __init__(self, connection) -> None:
        """``connection``: the consumer's Kombu connection, already connected."""
        self._channel = connection.channel()  # declares and the cancel queue
        self._confirms = ConfirmTracker(connection.connection)
        # Replies carry the broker user they are published as. RabbitMQ refuses a
        # ``user_id`` that is not the connection's own, so a gateway can trust it
        # (``PROXYMQ_REPLY_USERS``) where it could not trust a header.
        self._user_id = connection.userid

    def __len__(self) -> int:
        """Publishes the broker has not confirmed yet."""
        return len(self._confirms)

    def declare_dead_queues(self, services: Mapping[str, ServiceConfig]) -> None:
        """Declare ``<queue>.dead`` for every served queue (``services``: queue name ->
        its service), before consuming starts: a declare waits for the broker's answer,
        and waiting inside the event loop would dispatch other deliveries in the middle
        of dead-lettering one.

        Of the service queue's type: a quorum service's dead letters are replicated like
        its requests. A classic queue lives on the node that first declared it, and
        RabbitMQ refuses to declare it again (404) while that node is down, so a classic
        dead queue would keep a worker from consuming a quorum queue whenever its node is
        lost."""
        for queue, service in services.items():
            self.declare_dead_queue(queue, service)

    def declare_dead_queue(self, queue: str, service: ServiceConfig, nowait: bool = False) -> None:
        """Declare ``<queue>.dead``; ``nowait`` in the event loop (``declare_dead_queues``
        says why), where a dead letter came back unrouted: the queue was deleted."""
        arguments = {"x-queue-type": "quorum"} if service.queue_type == "quorum" else {}
        self._channel.queue_declare(
            queue + DEAD_SUFFIX, durable=True, auto_delete=False, arguments=arguments, nowait=nowait
        )

    def publish(
        self,
        routing_key: str,
        body: bytes,
        headers: dict,
        properties: dict,
        settled: Settled,
        mandatory: bool = False,
    ) -> None:
        """Publish to the default exchange (routing by queue name); ``settled`` gets the
        broker's answer (``proxymq.confirms``). AMQP properties as the envelope makes
        them (expiration in milliseconds, as text)."""
        message = amqp.Message(body, application_headers=headers, **properties)
        self._confirms.publish(routing_key, message, settled, mandatory)

    def reply(
        self, reply_to: str, correlation_id: str, reply: ReplyEnvelope, settled: Settled
    ) -> None:
        """Publish ``reply``; a reply queue that is gone (its gateway stopped) drops it."""
        self.reply_part(reply_to, correlation_id, encode_reply(reply), {}, settled, False)

    def reply_part(
        self,
        reply_to: str,
        correlation_id: str,
        body: bytes,
        headers: dict,
        settled: Settled,
        mandatory: bool = True,
    ) -> None:
        """Publish a reply, or one part of a streamed one (``headers`` say which).

        A stream's parts are mandatory: RETURNED then tells that its gateway is gone
        and the relay can stop. A whole reply is not: nothing is left to stop."""
        properties = {
            "correlation_id": correlation_id,
            "content_type": CONTENT_TYPE,
            "content_encoding": CONTENT_ENCODING,
            "delivery_mode": 1,
            "user_id": self._user_id,
        }
        self.publish(reply_to, body, headers, properties, settled, mandatory)

    def listen_for_cancels(
        self, cancel: Callable[[str, str], None], users: frozenset[str] | None
    ) -> str:
        """Declare this connection's cancel queue and consume it; return its name.

        A gateway whose client is gone sends the stream's correlation id and stream id
        there (the queue a stream's head names); ``cancel(correlation_id, stream_id)``
        runs in the consumer thread. A queue of our own rather than Celery's revoke:
        revoke is a broadcast to every worker through ``celery.pidbox``, which the
        gateway's broker user may not write, and it only marks a task id, while a
        stream's call must be interrupted.

        Taken only as published straight to this queue (the default exchange), and, with
        ``users`` (``PROXYMQ_CANCEL_USERS``), only from those broker users: ``user_id``
        is checked by the broker, as on replies. A message naming no stream is dropped
        first and quietly: a gateway probes the queue so every 2 s while it streams
        (``gateway.liveness``), and that must not log a word, whatever its user.
        """
        queue = new_cancel_queue()
        self._channel.queue_declare(queue, exclusive=True, auto_delete=True)

        def received(message: amqp.Message) -> None:
            properties, route = message.properties, message.delivery_info or {}
            user = properties.get("user_id")
            if (route.get("exchange"), route.get("routing_key")) != ("", queue):
                return
            correlation_id = properties.get("correlation_id")
            stream_id = cancelled_stream(properties.get("application_headers"))
            if not isinstance(correlation_id, str) or stream_id is None:
                return  # names no stream, cancels nothing: a gateway's probe, quietly
            if users is not None and user not in users:
                log.warning("dropped a cancel from %r: not in PROXYMQ_CANCEL_USERS", user)
                return
            cancel(correlation_id, stream_id)

        self._channel.basic_consume(queue, no_ack=True, callback=received)
        return queue

    def close(self) -> None:
        """The connection is gone or closing: whatever is unconfirmed is lost."""
        self._confirms.lose_all()

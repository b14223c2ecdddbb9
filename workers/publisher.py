"""Everything a worker publishes: replies, counted redeliveries, dead letters.

Through a Kombu producer pool with publisher confirms: a task returns (and Celery
acknowledges its request, acks late) only after the broker holds what it published, so a
worker killed in between redelivers the request rather than losing its answer.
"""

from __future__ import annotations

import kombu
from kombu.pools import ProducerPool

from proxymq.envelope import CONTENT_ENCODING, CONTENT_TYPE, ReplyEnvelope, encode_reply

RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5}


class Publisher:
    """Thread-safe: each publishing thread borrows a producer (and its connection)."""

    def __init__(self, broker_url: str, pool_size: int) -> None:
        connection = kombu.Connection(broker_url, transport_options={"confirm_publish": True})
        self._producers = ProducerPool(connection.Pool(limit=pool_size), limit=pool_size)

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
        properties = {
            "correlation_id": correlation_id,
            "content_type": CONTENT_TYPE,
            "content_encoding": CONTENT_ENCODING,
            "delivery_mode": 1,
        }
        self.publish(reply_to, encode_reply(reply), {}, properties)

    def close(self) -> None:
        self._producers.force_close_all()

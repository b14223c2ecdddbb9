"""Publishing replies to the gateway's reply queue.

Replies go through a Kombu producer pool with publisher confirms: the task returns (and
Celery acknowledges the request, acks late) only after the broker holds the reply, so a
worker killed in between redelivers the request rather than losing its answer.
"""

from __future__ import annotations

import kombu
from kombu.pools import ProducerPool

from proxymq.envelope import CONTENT_ENCODING, CONTENT_TYPE, ReplyEnvelope, encode_reply

RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5}


class ReplyPublisher:
    """Thread-safe: each publishing thread borrows a producer (and its connection)."""

    def __init__(self, broker_url: str, pool_size: int) -> None:
        connection = kombu.Connection(broker_url, transport_options={"confirm_publish": True})
        self._producers = ProducerPool(connection.Pool(limit=pool_size), limit=pool_size)

    def publish(self, reply_to: str, correlation_id: str, reply: ReplyEnvelope) -> None:
        """Publish ``reply``; a reply queue that is gone (its gateway stopped) drops it."""
        with self._producers.acquire(block=True) as producer:
            producer.publish(
                encode_reply(reply),
                exchange="",
                routing_key=reply_to,
                correlation_id=correlation_id,
                content_type=CONTENT_TYPE,
                content_encoding=CONTENT_ENCODING,
                delivery_mode=1,
                retry=True,
                retry_policy=RETRY_POLICY,
            )

    def close(self) -> None:
        self._producers.force_close_all()

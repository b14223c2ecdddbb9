"""Publisher confirms, tracked for one channel: the gateway's and the workers' one tracker.

In confirm mode RabbitMQ numbers a channel's publishes 1, 2, 3, ... and answers each
with basic.ack or basic.nack naming that number (``multiple``: every number up to it).
A ``mandatory`` message that no queue took comes back as basic.return *before* its ack,
so an ack for a returned message means "returned", not "delivered". Tracking the numbers
ourselves lets any number of confirms be in flight on one channel: a publish never waits
for the previous one's confirm (which is what py-amqp's ``confirm_publish`` and Kombu's
producer do).

Only the tracker may publish on its channel, or the numbers drift from the broker's.
It is not thread-safe: the gateway publishes under a lock in one gevent thread, a
worker from its consumer thread only. Outcomes arrive through the channel's events, in
whichever thread reads the connection.
"""

from __future__ import annotations

from collections.abc import Callable

import amqp
from amqp import spec

ACK, NACK, RETURNED, LOST = "ack", "nack", "returned", "lost"

Settled = Callable[[str], None]


class ConfirmTracker:
    """Publishes on a confirm-mode channel and calls each publish's ``settled(outcome)``."""

    def __init__(self, channel: amqp.Channel) -> None:
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        self._channel = channel
        self._tag = 0
        self._pending: dict[int, tuple[str | None, Settled]] = {}
        self._returned: set[str] = set()

    def __len__(self) -> int:
        """Publishes still waiting for the broker's answer."""
        return len(self._pending)

    def publish(
        self, routing_key: str, message: amqp.Message, settled: Settled, mandatory: bool = False
    ) -> int:
        """Publish to the default exchange; ``settled`` gets ACK, NACK, RETURNED or LOST.

        Numbered before it is sent, so that a confirm can never find it missing.
        Sent with the channel's ``send_method``, as py-amqp's ``basic_publish`` does after
        it first reads whatever the broker has sent (``drain_events(timeout=0)``, to
        notice ``connection.blocked``). That read cost a third of a worker's consumer
        thread, and it would dispatch deliveries and confirms from inside a publish;
        the connection's reader notices ``connection.blocked`` anyway. A publish that
        raises may leave half a frame on the wire: the caller must give up the
        connection (``lose_all``).
        """
        self._tag += 1
        tag = self._tag
        self._pending[tag] = (message.properties.get("correlation_id"), settled)
        try:
            self._channel.send_method(
                spec.Basic.Publish, "Bssbb", (0, "", routing_key, mandatory, False), message
            )
        except BaseException:
            self._pending.pop(tag, None)
            raise
        return tag

    def forget(self, tag: int) -> None:
        """Stop waiting for one publish (its caller gave up on it)."""
        self._pending.pop(tag, None)

    def lose_all(self) -> None:
        """The connection is gone: every publish still pending is LOST."""
        pending, self._pending = self._pending, {}
        self._returned.clear()
        for _, settled in pending.values():
            settled(LOST)

    def _settle(self, delivery_tag: int, multiple: bool, outcome: str) -> None:
        tags = [t for t in self._pending if t <= delivery_tag] if multiple else [delivery_tag]
        for tag in tags:
            entry = self._pending.pop(tag, None)
            if entry is None:
                continue
            key, settled = entry
            if key is not None and key in self._returned:
                self._returned.discard(key)
                settled(RETURNED)
            else:
                settled(outcome)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, ACK)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, NACK)

    def _on_return(self, exc, exchange, routing_key, message) -> None:
        key = message.properties.get("correlation_id")
        if key is not None:
            self._returned.add(key)

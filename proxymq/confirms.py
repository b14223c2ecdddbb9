"""Publisher confirms, tracked per connection: the gateway's and the workers' one tracker.

In confirm mode RabbitMQ numbers a channel's publishes 1, 2, 3, ... and answers each
with basic.ack or basic.nack naming that number (``multiple``: every number up to it).
A ``mandatory`` message that no queue took comes back as basic.return *before* its ack,
so an ack for a returned message means "returned", not "delivered". Tracking the numbers
ourselves lets any number of confirms be in flight on one channel: a publish never waits
for the previous one's confirm (which is what py-amqp's ``confirm_publish`` and Kombu's
producer do).

The tracker publishes on a channel of its own, and after a nack it moves to a fresh one
(at most once per ``renew_interval``). RabbitMQ 3.10 pins, in each channel, the member
list of a quorum queue as the queue's record named it when the channel first published
to it. A channel that first publishes in the second between a leader's node dying and a
new leader being recorded asks the dead node first, is refused (``badrpc``), and nacks
*every* publish to that queue for as long as that node stays down (seen with Debian 12's
RabbitMQ 3.10; rabbitmq-server#9241 made later releases ask Ra for the leader first). A
fresh channel reads the record again. A nack for a queue that is really full costs two
channels a second; the one that was nacked stays open until its last confirm arrives.

Only the tracker may publish on its channels, or the numbers drift from the broker's.
It is not thread-safe: the gateway publishes under a lock in one gevent thread, a
worker from its consumer thread only. Outcomes arrive through the channels' events, in
whichever thread reads the connection, so the tracker itself never reads: a channel is
opened and closed without waiting for the broker's answer (RabbitMQ handles the methods
of a connection in order, so a publish right behind ``channel.open`` is fine).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import amqp
from amqp import spec

ACK, NACK, RETURNED, LOST = "ack", "nack", "returned", "lost"

Settled = Callable[[str], None]

# A returned message is told by its correlation id, or by this header, which a mandatory
# message without one (a dead letter as it came) carries instead.
PUBLISH_ID = "x-proxymq-publish-id"


def _return_key(message: amqp.Message) -> str | None:
    """The header when it is a string (a message published again keeps its client's
    headers, and a table or an array there cannot be looked up in a set), else the
    correlation id."""
    headers = message.properties.get("application_headers") or {}
    key = headers.get(PUBLISH_ID) if isinstance(headers, dict) else None
    if isinstance(key, str) and key:
        return key
    correlation_id = message.properties.get("correlation_id")
    return correlation_id if isinstance(correlation_id, str) else None


log = logging.getLogger(__name__)


class _Lane:
    """One confirm-mode channel and its publishes that await the broker's answer."""

    __slots__ = ("channel", "pending", "tag")

    def __init__(self, channel: amqp.Channel) -> None:
        self.channel = channel
        self.tag = 0
        self.pending: dict[int, tuple[str | None, Settled]] = {}


Ticket = tuple[_Lane, int]  # what ``publish`` returns and ``forget`` takes


class ConfirmTracker:
    """Publishes on confirm-mode channels of ``connection`` and calls each publish's
    ``settled(outcome)``."""

    def __init__(
        self,
        connection: amqp.Connection,
        renew_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Opens the first channel and waits for the broker's answer (the caller is
        connecting, and a refusal should surface here)."""
        self._connection = connection
        self._renew_interval = renew_interval
        self._clock = clock
        channel = connection.channel()
        channel.confirm_select()
        self._lane = self._track(channel)
        self._retired: list[_Lane] = []
        self._nacked = False
        self._renewed_at = clock()
        self._returned: set[str] = set()

    def __len__(self) -> int:
        """Publishes still waiting for the broker's answer."""
        return len(self._lane.pending) + sum(len(lane.pending) for lane in self._retired)

    def publish(
        self, routing_key: str, message: amqp.Message, settled: Settled, mandatory: bool = False
    ) -> Ticket:
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
        self._maintain()
        lane = self._lane
        lane.tag += 1
        tag = lane.tag
        # Only a mandatory message can come back: the others need no key (nor the
        # header look-up, on every reply a worker publishes).
        lane.pending[tag] = (_return_key(message) if mandatory else None, settled)
        try:
            lane.channel.send_method(
                spec.Basic.Publish, "Bssbb", (0, "", routing_key, mandatory, False), message
            )
        except BaseException:
            lane.pending.pop(tag, None)
            raise
        return lane, tag

    def renew_unless_opened_since(self, since: float) -> None:
        """Publish from now on on a channel opened at ``since`` or later (by the tracker's
        clock), whatever the renewal interval: the gateway's test of whether a nack is
        the queue's own refusal (``gateway/refusals.py``)."""
        if self._renewed_at < since:
            self._renew()

    def forget(self, ticket: Ticket) -> None:
        """Stop waiting for one publish (its caller gave up on it)."""
        lane, tag = ticket
        lane.pending.pop(tag, None)

    def lose_all(self) -> None:
        """The connection is gone: every publish still pending is LOST."""
        lanes, self._retired = [self._lane, *self._retired], []
        self._returned.clear()
        for lane in lanes:
            pending, lane.pending = lane.pending, {}
            for _, settled in pending.values():
                settled(LOST)

    # -- channels -----------------------------------------------------------------------

    def _track(self, channel: amqp.Channel) -> _Lane:
        lane = _Lane(channel)
        channel.events["basic_ack"].add(
            lambda tag, multiple: self._settle(lane, tag, multiple, ACK)
        )
        channel.events["basic_nack"].add(
            lambda tag, multiple: self._settle(lane, tag, multiple, NACK)
        )
        channel.events["basic_return"].add(self._on_return)
        return lane

    def _maintain(self) -> None:
        """Before a publish: move to a fresh channel after a nack (see the module's
        docstring), and close the channels left behind once nothing awaits them."""
        if self._nacked and self._clock() - self._renewed_at >= self._renew_interval:
            self._renew()
        if self._retired:
            for lane in [lane for lane in self._retired if not lane.pending]:
                self._retired.remove(lane)
                # The broker's close-ok, read by the connection's reader, frees the channel.
                lane.channel.send_method(spec.Channel.Close, "BsBB", (0, "", 0, 0))

    def _renew(self) -> None:
        self._nacked = False
        self._renewed_at = self._clock()
        channel = self._connection.Channel(self._connection)
        channel.send_method(spec.Channel.Open, "s", ("",))
        channel.confirm_select(nowait=True)
        self._retired.append(self._lane)
        self._lane = self._track(channel)
        log.info("a publish was nacked; publishing on a fresh channel")

    # -- the broker's answers -----------------------------------------------------------

    def _settle(self, lane: _Lane, delivery_tag: int, multiple: bool, outcome: str) -> None:
        pending = lane.pending
        tags = [t for t in pending if t <= delivery_tag] if multiple else [delivery_tag]
        for tag in tags:
            entry = pending.pop(tag, None)
            if entry is None:
                continue
            key, settled = entry
            if key is not None and key in self._returned:
                self._returned.discard(key)
                settled(RETURNED)
            else:
                if outcome == NACK and lane is self._lane:
                    self._nacked = True
                settled(outcome)

    def _on_return(self, exc, exchange, routing_key, message) -> None:
        key = _return_key(message)
        if key is not None:
            self._returned.add(key)

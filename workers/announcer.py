"""Announce each served service's state on ``proxymq.status`` (``proxymq.status``).

Every ``INTERVAL`` seconds, from the consumer's own timer (no thread of its own), the
announcer asks the broker how many messages each served queue holds and, as each answer
comes in, publishes that service's ``Status``: its breaker and pause (``FlowState``), the
drain rate (requests this worker took off the queue per second, smoothed) and the depth.
A change of a breaker or pause is announced at once (``FlowState.on_change``, from any
thread, through ``call_soon``).

Nothing here waits for the broker: the consumer thread reads the connection (Celery's
event loop), so a synchronous ``queue_declare`` would block it and dispatch deliveries
from inside the declare. The passive declare is sent with ``send_method`` and its
``declare-ok`` taken by a handler on the channel, as ``proxymq.confirms`` publishes.
Everything goes on a channel of its own: an error there (a queue deleted under the
passive declare, an exchange deleted under the publish) closes that channel only, and
the handler of its ``channel.close`` takes it quietly instead of letting py-amqp raise it
out of the event loop, which would restart the consumer. The next round opens a fresh
channel and declares the exchange again. A round asks one queue at a time, the next once
the last one's status is published: a queue deleted under its worker closes the channel
at its own declare, after the others' statuses went out, and is asked last from then on.

py-amqp has no public hook for a method nobody waits for; ``Channel._callbacks`` is its
own table of such handlers (``tests/integration/test_failfast.py`` pins the behaviour).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping

import amqp
from amqp import spec

from proxymq import status as wire
from proxymq.config import ServiceConfig
from workers.flow.state import FlowState

log = logging.getLogger(__name__)

SMOOTHING_S = 4.0  # time constant of the drain rate's moving average
MIN_SAMPLE_S = 0.5  # a round sooner than this after the last one (a change) keeps the rate


class DrainRate:
    """Requests taken off one queue per second while it had a backlog: the rate a new
    request's wait is estimated with.

    An exponentially weighted average with a time constant (rounds are not evenly spaced:
    a change is announced at once). Only a round with a backlog from its start to its end
    measures the service's capacity; another measures how fast requests arrived, so it
    may raise the estimate but never lower it (the estimate matters only when there is a
    backlog). The first such round is taken whole: averaging it up from an idle 0 would
    overestimate every wait for the first several seconds of a backlog. Before it, the
    rate is 0, "unknown" (the gateway then refuses nothing for its wait): the rounds
    before measure only how fast requests arrived, and a wait estimated from that refused
    requests with a 60 s deadline as the first backlog began (``bench/failfast.py``).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since = clock()
        self._count = 0
        self._measured = False  # a round with a backlog throughout was seen
        self._backlogged = False  # at the end of the last round, i.e. this one's start
        self.rate = 0.0

    def add(self, n: int = 1) -> None:
        self._count += n

    def sample(self, backlogged: bool = True) -> float:
        now = self._clock()
        elapsed = now - self._since
        if elapsed < MIN_SAMPLE_S:
            return self.rate
        observed = self._count / elapsed
        self._since, self._count = now, 0
        throughout, self._backlogged = backlogged and self._backlogged, backlogged
        if not self._measured:
            if throughout:
                self._measured, self.rate = True, observed
        elif throughout or observed > self.rate:
            weight = 1 - math.exp(-elapsed / SMOOTHING_S)
            self.rate += weight * (observed - self.rate)
        return self.rate


class Announcer:
    """The status announcements of one worker, in its consumer thread."""

    def __init__(
        self,
        consumer,
        node: Callable[[], str],
        services: Mapping[str, ServiceConfig],
        flows: Mapping[str, FlowState],
        held: Callable[[str], int],
    ) -> None:
        """``services``: queue name -> its service; ``flows``: service name -> its flow
        state; ``held(queue)``: messages taken and not yet called."""
        self._consumer = consumer
        self._node = node
        self._services = services
        self._flows = flows
        self._held = held
        self.rates = {queue: DrainRate() for queue in services}
        self._depths: dict[str, int] = dict.fromkeys(services, 0)
        self._order = list(services)  # the order of a round's declares (see _on_close)
        self._asked: deque[str] = deque()  # the round's queues still to ask; the first is asked
        self._connection: amqp.Connection | None = None
        self._user: str | None = None
        self._channel: amqp.Channel | None = None
        self._timer = None
        for queue, service in services.items():
            flow = flows.get(service.name)
            if flow is not None:
                flow.on_change(lambda q=queue: consumer.call_soon(self._announce_safely, q))

    def open(self, connection) -> None:
        """Start announcing on ``connection`` (Kombu's), after every connect. Celery drops
        the timer entries of a lost connection; the old one is cancelled anyway."""
        self._connection = connection.connection
        self._user = connection.userid
        self._channel = None
        self._asked.clear()
        if self._timer is not None:
            self._consumer.timer.cancel(self._timer)
        self._timer = self._consumer.timer.call_repeatedly(wire.INTERVAL, self._round)
        self._round()

    def close(self) -> None:
        if self._timer is not None:
            self._consumer.timer.cancel(self._timer)
            self._timer = None
        self._connection = self._channel = None

    # -- a round: ask every depth, announce each as its answer comes ----------------------

    def _round(self) -> None:
        self._asked.clear()
        self._asked.extend(self._order)
        self._ask_next()

    def _ask_next(self) -> None:
        """The passive declare of the round's next queue (``_asked[0]``)."""
        try:
            channel = self._open_channel()
            # queue.declare, passive: (ticket, queue, passive, durable, exclusive,
            # auto_delete, nowait, arguments)
            args = (0, self._asked[0], True, False, False, False, False, {})
            channel.send_method(spec.Queue.Declare, "BsbbbbbF", args)
        except Exception as exc:  # the connection is going; Celery reconnects
            log.debug("could not ask the queue depths: %r", exc)

    def _open_channel(self) -> amqp.Channel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        connection = self._connection
        if connection is None:
            raise ConnectionError("not connected")
        channel = connection.Channel(connection)
        channel.send_method(spec.Channel.Open, "s", ("",))
        channel.is_open = True  # sent; the broker's open-ok needs no handling
        channel._callbacks[spec.Queue.DeclareOk] = self._on_depth
        channel._callbacks[spec.Channel.Close] = self._on_close(channel)
        # exchange.declare, nowait: (ticket, exchange, type, passive, durable,
        # auto_delete, internal, nowait, arguments); again on every fresh channel, so an
        # exchange someone deleted is back within a round.
        args = (0, wire.EXCHANGE, wire.EXCHANGE_TYPE, False, True, False, False, True, {})
        channel.send_method(spec.Exchange.Declare, "BssbbbbbF", args)
        self._channel = channel
        return channel

    def _on_depth(self, queue: str, message_count: int, consumer_count: int) -> None:
        self._depths[queue] = message_count
        self._announce_safely(queue)
        if self._asked and self._asked[0] == queue:
            self._asked.popleft()
            if self._asked:
                self._ask_next()

    def _on_close(self, channel: amqp.Channel) -> Callable[..., None]:
        def closed(reply_code, reply_text, class_id, method_id) -> None:
            log.warning("status channel closed by the broker: %s %s", reply_code, reply_text)
            if (class_id, method_id) == spec.Queue.Declare and self._asked:
                self._order.remove(missing := self._asked[0])  # answers come in order
                self._order.append(missing)
            try:
                channel.send_method(spec.Channel.CloseOk)
            finally:
                channel.collect()
                if self._channel is channel:
                    self._channel = None
                self._asked.clear()

        return closed

    # -- announcing -----------------------------------------------------------------------

    def _announce_safely(self, queue: str) -> None:
        try:
            self._announce(queue)
        except Exception as exc:
            log.debug("could not announce the state of %s: %r", queue, exc)

    def _announce(self, queue: str) -> None:
        service = self._services[queue]
        flow = self._flows.get(service.name)
        now = time.time()
        breaker = flow.breaker_open_until() if flow else None
        paused = flow.paused_until() if flow else None
        held = self._held(queue)
        # No calls while the breaker is open or the service paused: that says nothing of
        # how fast it drains once they resume.
        calling = max(breaker or 0.0, paused or 0.0) <= now
        backlogged = self._depths[queue] > 0 or held > 0
        status = wire.Status(
            service=service.name,
            worker=self._node(),
            sent_at=now,
            breaker_open_until=breaker,
            paused_until=paused,
            drain_rate=round(self.rates[queue].sample(backlogged and calling), 3),
            depth=self._depths[queue],
            held=held,
        )
        channel = self._open_channel()
        message = amqp.Message(
            status.encode(),
            content_type=wire.CONTENT_TYPE,
            delivery_mode=1,
            expiration=str(int(wire.MAX_AGE * 1000)),
            # Checked by the broker against this connection's user: a gateway with
            # PROXYMQ_REPLY_USERS takes a status only from those users.
            user_id=self._user,
        )
        # basic.publish: (ticket, exchange, routing_key, mandatory, immediate)
        args = (0, wire.EXCHANGE, "", False, False)
        channel.send_method(spec.Basic.Publish, "Bssbb", args, message)

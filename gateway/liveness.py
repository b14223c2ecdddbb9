"""Is a stream's worker still there? Its cancel queue tells.

A worker killed outright (SIGKILL, OOM) sends no ``abort``: without this, its client's
answer would wait out ``PROXYMQ_STREAM_IDLE_TIMEOUT`` of silence. Every stream's head
names its worker's cancel queue, which is exclusive to the worker's connection: the
broker deletes it the moment that connection closes. So while streams are open, every
``PROBE_INTERVAL`` seconds the gateway publishes a probe to each of their cancel queues,
mandatory and confirmed (``BrokerLink.probe``): the broker returns it when the queue is
gone (the worker is gone: the stream is cut off, ``worker-gone``), and confirms it when
the queue is there.

Why a message and not a passive declare: a declare of another connection's exclusive
queue is refused (``RESOURCE_LOCKED``) and RabbitMQ logs every refused declare as an
error, so a broker's log would get a line every 2 s per streaming worker. A probe names
no stream, and a worker drops a message naming no stream before anything else, without
a word (``workers.publisher``), whoever sent it.

A stream's last parts may still be on their way when its worker dies just after
sending them: a queue found gone is judged again after ``GRACE`` seconds, and only a
stream still open then is cut off. A probe that tells nothing (the broker connection
down, no confirm in time) leaves the stream as it is (bounded by the idle timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import gevent

from gateway.streams import OPEN, Stream
from proxymq.envelope import is_cancel_queue

PROBE_INTERVAL = 2.0
GRACE = 0.5


class WorkerWatch:
    """One per gateway process: a greenlet that probes while any stream is open."""

    def __init__(
        self,
        probe: Callable[[str], bool | None],
        streams: Callable[[], Iterable[Stream]],
        interval: float = PROBE_INTERVAL,
    ) -> None:
        """``probe(queue)``: True the queue is there, False it is gone, None unknown;
        ``streams`` lists the streams in flight."""
        self._probe, self._streams, self._interval = probe, streams, interval
        self._greenlet: gevent.Greenlet | None = None

    def watch(self) -> None:
        """A stream started: probe until none is open."""
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            gevent.sleep(self._interval)
            queues = self._queues()
            if not queues:
                return
            probes = {queue: gevent.spawn(self._probe, queue) for queue in queues}
            gevent.joinall(list(probes.values()))
            gone = {queue for queue, probe in probes.items() if probe.value is False}
            if gone:
                gevent.sleep(GRACE)
                self._cut_off(gone)

    def _queues(self) -> set[str]:
        """The cancel queues of the open streams (a name of another form is not
        probed, whatever a head says)."""
        streams = [s for s in self._streams() if s.state == OPEN]
        return {s.cancel_to for s in streams if is_cancel_queue(s.cancel_to)}

    def _cut_off(self, gone: set[str]) -> None:
        for stream in list(self._streams()):
            if stream.cancel_to in gone:
                stream.worker_gone()

"""Job callbacks: POST a finished job's answer to the URL its client named.

The URL comes from a client, so the connection is guarded (``proxymq.outbound``, as the
fetcher's): it never reaches loopback, private or link-local addresses (checked on the
address actually connected to) unless ``PROXYMQ_CALLBACK_ALLOW_PRIVATE=true``.

A receiver is not trusted to behave either. Callbacks travel through the broker
(``workers.callback_queue``) and are sent by threads of their own, so a slow receiver
holds no call thread and no request. Connecting may take ``CONNECT_TIMEOUT`` and the
whole attempt ``TIMEOUT``: the socket is shut then whatever the receiver trickles
(``proxymq.outbound.DEADLINES``, as downstream calls are). The threads serve submitters
in turn (the job's owner), at most ``PER_SUBMITTER`` attempts at once each, and each
submitter's receiving hosts in turn, at most ``PER_HOST`` attempts at once per host
whoever submitted them (``FairQueue``): a credential naming slow receivers, on however
many hosts, cannot hold up other credentials' callbacks. The gateway does not check
credentials: fairness is between the credentials clients send, and one client sending
several has several shares (``docs/jobs.md``). Only its status line and headers
are read (http.client bounds those), never its body. Redirects are not followed: the
signature and the result go to the URL the client named, or nowhere.

With ``PROXYMQ_CALLBACK_SECRET`` set, ``X-ProxyMQ-Signature: t=<unix seconds>,v1=<hex>``
carries the HMAC-SHA256 of ``"<t>." + body``: the receiver checks it and refuses an old
``t``, so a captured callback cannot be replayed later.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from proxymq import outbound
from proxymq.envelope import ReplyEnvelope

log = logging.getLogger(__name__)

TIMEOUT = 10.0  # seconds for one whole attempt: connect, send, status and headers
CONNECT_TIMEOUT = 3.0  # of which connecting may take this much
THREADS = 16
# Attempts at once for one submitter (a job's owner; an anonymous client's callbacks
# count by receiving host instead, ``Callback.party``): the threads are shared
# round-robin between submitters, so it takes four submitters with slow receivers to
# hold all 16 threads, and one submitter, however many hosts it names, leaves 12 to
# everyone else; four at once still lets a submitter with fast receivers send its
# callbacks in parallel.
PER_SUBMITTER = 4
# Attempts at once of all anonymous clients together: one of them naming many hosts
# gets a share per host, so together they may hold no more than this, and clients with
# a credential (any: the gateway checks none) always keep 6 threads; 10 is more than
# four slow anonymous hosts hold (8), so four of them still leave another anonymous
# client a thread.
PER_ANONYMOUS = 10
# Attempts at once to one receiving host (by name, whatever the port), whoever submitted
# them: within a submitter's share the threads go round-robin between its hosts, so a
# slow receiver holds at most this many (a host is as slow for every submitter).
PER_HOST = 2
# Callbacks a worker holds for one party, and of one party for one host (sending or
# waiting): twice what may be in flight, so a thread that is done finds the next one
# here. Beyond, they wait in the broker (``workers.callback_queue`` defers them) rather
# than in the worker's prefetch, where they would keep other parties' callbacks from
# being taken at all: by hosts alone, one submitter naming 16 hosts (names of a wildcard
# DNS zone cost nothing) would fill the 64 prefetched. The host's backlog is each
# party's: counted for everyone, a client naming another's host would defer its
# callbacks for as long as it kept 4 there.
SUBMITTER_BACKLOG = 8
HOST_BACKLOG = 4
ANONYMOUS_BACKLOG = 2 * PER_ANONYMOUS
# What an anonymous client's party (its receiving host) is prefixed with: no owner hash
# (hex) starts so.
ANONYMOUS = "@"
# What callbacks have sent since they borrowed the fetcher's session; receivers may match
# on it, so renaming it is a change of its own.
USER_AGENT = "proxymq-fetcher/0.1"


@dataclass(frozen=True, slots=True)
class Callback:
    """One callback to send: where, for which job, what, how many tries so far, and
    whose it is."""

    url: str
    correlation_id: str
    body: bytes
    attempts: int  # attempts made before this one
    # What fairness counts by first (``party``): the job's owner
    # (``proxymq.jobs.owner_hash``, never the credential), "" for an anonymous client.
    submitter: str

    @property
    def party(self) -> str:
        """Whom the threads are shared between: the submitter; for an anonymous client,
        who has no identity to tell apart, its receiving host (``@`` and the name, which
        no owner hash looks like). So anonymous clients stand among themselves as they
        did before submitters were counted, and none of them holds up a client with a
        credential beyond ``PER_HOST`` per host it names."""
        return self.submitter or ANONYMOUS + self.host

    @property
    def host(self) -> str:
        """What fairness counts by within a party: the receiving host's name."""
        try:
            return (urlsplit(self.url).hostname or "").lower()
        except ValueError:
            return ""


def payload(correlation_id: str, reply: ReplyEnvelope) -> bytes:
    """The job's answer; it names the job by the correlation id the 202 answer gave
    (``X-Correlation-ID``), never by the job id, which is the client's secret."""
    body: dict = {"correlation_id": correlation_id, "status": reply.status}
    body["headers"] = reply.headers
    if reply.error:
        body["error"] = reply.error
        body["message"] = reply.message
    try:
        body["body"] = reply.body.decode()
    except UnicodeDecodeError:
        body["body_base64"] = base64.b64encode(reply.body).decode()
    return json.dumps(body).encode()


def signature(secret: str, body: bytes, timestamp: int) -> str:
    signed = f"{timestamp}.".encode() + body
    return f"t={timestamp},v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"


def loggable(url: str) -> str:
    """The URL for a log line: without userinfo or query (either may hold a credential),
    and ``repr``-escaped, so a client's control characters cannot forge log lines."""
    parts = urlsplit(url)
    where = parts.hostname or ""
    with contextlib.suppress(ValueError):
        if parts.port:
            where += f":{parts.port}"
    return repr(f"{parts.scheme}://{where}{parts.path}")


def anonymous(party: str) -> bool:
    """Whether ``party`` (``Callback.party``) is an anonymous client's receiving host."""
    return party.startswith(ANONYMOUS)


class FairQueue:
    """Callbacks waiting for a thread, by submitter and, within each, by receiving host.
    ``take`` hands them out in turn from each submitter with fewer than
    ``per_submitter`` in flight and, within its share, in turn from each of its hosts
    with fewer than ``per_host`` in flight (counted across submitters), so one
    submitter's many (or slow) callbacks never wait in front of another submitter's, nor
    one host's in front of another host's."""

    def __init__(
        self, per_submitter: int, per_host: int, per_anonymous: int = PER_ANONYMOUS
    ) -> None:
        self._per_submitter, self._per_host = per_submitter, per_host
        self._per_anonymous = per_anonymous
        self._changed = threading.Condition()
        # submitter -> host -> callbacks, both in turn order
        self._waiting: dict[str, dict[str, deque[Callback]]] = {}
        self._active = _Tally()  # in flight
        self._held = _Tally()  # waiting or in flight

    def put(self, callback: Callback) -> None:
        with self._changed:
            hosts = self._waiting.setdefault(callback.party, {})
            hosts.setdefault(callback.host, deque()).append(callback)
            self._held.add(callback)
            self._changed.notify()

    def held(self, callback: Callback) -> tuple[int, int]:
        """Callbacks waiting or in flight of ``callback``'s party, and of that party for
        its host: the backlog is each party's, so that another client naming a host
        (a filtered port of it, 3 s a connect) cannot defer the host's own clients."""
        with self._changed:
            return self._held.submitters[callback.party], self._held.pairs[_pair(callback)]

    def held_anonymous(self) -> int:
        """Callbacks of anonymous clients waiting or in flight, all together."""
        with self._changed:
            return self._held.anonymous

    def take(self) -> Callback:
        with self._changed:
            while (turn := self._turn()) is None:
                self._changed.wait()
            callback = self._pop(*turn)
            self._active.add(callback)
            return callback

    def done(self, callback: Callback) -> None:
        with self._changed:
            self._active.remove(callback)
            self._held.remove(callback)
            self._changed.notify_all()

    def _turn(self) -> tuple[str, str] | None:
        """The submitter and host whose callback is next: the first in turn that both
        have room; None when no waiting callback may go now."""
        anonymous_room = self._active.anonymous < self._per_anonymous
        for submitter, hosts in self._waiting.items():
            if anonymous(submitter) and not anonymous_room:
                continue
            if self._active.submitters[submitter] < self._per_submitter:
                for host in hosts:
                    if self._active.hosts[host] < self._per_host:
                        return submitter, host
        return None

    def _pop(self, submitter: str, host: str) -> Callback:
        """Take the host's first callback; the host goes to the end of its submitter's
        turn order, the submitter to the end of the submitters' (while they wait)."""
        hosts = self._waiting.pop(submitter)
        waiting = hosts.pop(host)
        callback = waiting.popleft()
        if waiting:
            hosts[host] = waiting
        if hosts:
            self._waiting[submitter] = hosts
        return callback


class _Tally:
    """Callbacks counted by submitter and by host. A count back to 0 is dropped: hosts
    are named by clients, so they must not pile up."""

    def __init__(self) -> None:
        self.submitters: Counter[str] = Counter()
        self.hosts: Counter[str] = Counter()
        self.pairs: Counter[tuple[str, str]] = Counter()  # (party, host)
        self.anonymous = 0

    def add(self, callback: Callback) -> None:
        self.submitters[callback.party] += 1
        self.hosts[callback.host] += 1
        self.pairs[_pair(callback)] += 1
        self.anonymous += anonymous(callback.party)

    def remove(self, callback: Callback) -> None:
        self.anonymous -= anonymous(callback.party)
        counted = (
            (self.submitters, callback.party),
            (self.hosts, callback.host),
            (self.pairs, _pair(callback)),
        )
        for counts, key in counted:
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]


def _pair(callback: Callback) -> tuple[str, str]:
    return callback.party, callback.host


class CallbackSender:
    """Sends callbacks in threads of its own; each attempt's outcome goes to the ``done``
    it was submitted with (in that thread). Retrying is not its business: a failed
    callback goes back through the broker (``workers.callback_queue``)."""

    def __init__(self, secret: str | None, allow_private: bool, threads: int = THREADS) -> None:
        self._secret = secret
        self._policy = outbound.policy_for(allow_private)
        self._waiting = FairQueue(PER_SUBMITTER, PER_HOST)
        for number in range(threads):
            name = f"proxymq-callback-{number}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    def busy_with(self, callback: Callback) -> bool:
        """Whether this worker already holds enough callbacks of ``callback``'s party,
        or of that party for its host."""
        submitter, host = self._waiting.held(callback)
        if anonymous(callback.party) and self._waiting.held_anonymous() >= ANONYMOUS_BACKLOG:
            return True
        return submitter >= SUBMITTER_BACKLOG or host >= HOST_BACKLOG

    def submit(self, callback: Callback, done: Callable[[Callback, bool], None]) -> None:
        """Queue one attempt and return at once."""
        self._waiting.put(_Submitted(callback, done))

    def _serve(self) -> None:
        while True:
            submitted = self._waiting.take()
            callback = submitted.callback
            try:
                delivered = self.attempt(callback)
            except Exception:  # a bug must not stop the thread
                log.exception("callback for %s failed", callback.correlation_id)
                delivered = False
            finally:
                self._waiting.done(submitted)
            try:
                submitted.done(callback, delivered)
            except Exception:
                log.exception("settling the callback for %s failed", callback.correlation_id)

    def attempt(self, callback: Callback) -> bool:
        """POST the callback once; True on a 2xx."""
        url, correlation_id = callback.url, callback.correlation_id
        try:
            status = self._post(url, correlation_id, callback.body)
            if 200 <= status < 300:
                return True
            problem = f"HTTP {status}"
        except Exception as exc:  # a client-named URL may fail in any way: log, retry
            problem = type(exc).__name__
        log.warning(
            "callback %s for %s failed (%s), attempt %d",
            loggable(url),
            correlation_id,
            problem,
            callback.attempts + 1,
        )
        return False

    def _post(self, url: str, correlation_id: str, body: bytes) -> int:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Correlation-ID": correlation_id,
        }
        if self._secret:
            headers["X-ProxyMQ-Signature"] = signature(self._secret, body, int(time.time()))
        when = time.monotonic() + TIMEOUT
        connection = outbound.connection(
            parts.scheme, parts.hostname or "", parts.port, self._policy, CONNECT_TIMEOUT
        )
        try:
            connection.connect()  # within CONNECT_TIMEOUT; then the rest of TIMEOUT
            connection.sock.settimeout(max(0.1, when - time.monotonic()))
            deadline = outbound.DEADLINES.add(when, connection.read_socket)
            try:
                connection.request("POST", target, body=body, headers=headers)
                return connection.getresponse().status
            finally:
                outbound.DEADLINES.cancel(deadline)
        finally:
            connection.close()


class _Submitted:
    """A callback with what to call when its attempt is over; counted by party and host
    in the fair queue, which reads nothing else."""

    __slots__ = ("callback", "done")

    def __init__(self, callback: Callback, done: Callable[[Callback, bool], None]) -> None:
        self.callback, self.done = callback, done

    @property
    def party(self) -> str:
        return self.callback.party

    @property
    def host(self) -> str:
        return self.callback.host

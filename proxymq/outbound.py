"""Outbound HTTP to URLs a client named: which addresses may be reached, and a Session that
only connects to those.

A server that fetches (or calls back) a URL a client chose is a server-side request
forgery tool unless it refuses internal addresses: cloud metadata (169.254.169.254), the
pod's own loopback, the cluster's private ranges. The fetcher and the job callbacks both
face this, so the rule lives here, in the shared package, and both use it.

The rule is applied to *resolved* addresses, never to the host name, because any name
can resolve to 127.0.0.1. And it is applied by the connection itself, at the moment a
socket is opened: the Session's connections override urllib3's ``_new_conn`` (which
resolves the name and connects in one step) to resolve with ``resolve_checked`` and
connect to exactly the addresses it approved. So there is one DNS lookup per new
connection and no window between check and connect for a DNS answer to change (DNS
rebinding). If a name resolves to several addresses and any one is refused, the whole
name is refused, so a mixed answer cannot reach an internal address on a retry. Every
redirect hop that needs a new connection goes through the same path; a pooled
keep-alive connection is reused only for the host it was opened (and checked) for. TLS
still verifies the certificate against the host *name*: only the socket's peer address
is chosen here.

The price is overriding ``_new_conn``, a private urllib3 method whose signature has been
stable since urllib3 1.x; ``tests/fetcher`` exercise it against real servers, so an
urllib3 upgrade that changes it fails the tests instead of silently skipping the guard.

Residual risk: name resolution itself is not bounded by any request timeout; it is
bounded by the system resolver's own timeout and attempts (``/etc/resolv.conf``).

Deadlines on whole exchanges live here too (``Deadlines``, ``DEADLINES``, ``bounded``):
a socket timeout bounds each read, never a whole call, so a peer sending a byte now and
then keeps any call alive for as long as it likes. One thread shuts each registered
socket at its deadline, so whatever read or write waits on it returns at once.
"""

from __future__ import annotations

import contextlib
import heapq
import http.cookiejar
import ipaddress
import itertools
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
)
from urllib3.util.connection import create_connection

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy: TypeAlias = Callable[[IPAddress], bool]
"""Answers True when connecting to the address is allowed."""

Resolved: TypeAlias = tuple[socket.AddressFamily, tuple]
"""An address family and the socket address to connect to."""


class BlockedAddressError(Exception):
    """The host resolved to an address the policy refuses.

    Deliberately not an ``OSError``: urllib3 and requests wrap and retry ``OSError``s
    from a connect, while this must reach the caller unchanged and at once.
    """

    def __init__(self, host: str, address: IPAddress) -> None:
        super().__init__(f"{host} resolves to refused address {address}")
        self.host = host
        self.address = address


# -- which addresses ------------------------------------------------------------------------


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, Teredo), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def is_public_address(address: IPAddress) -> bool:
    """The default policy: only globally routable unicast addresses.

    ``is_global`` already excludes loopback, RFC 1918, ULA, link-local, unspecified,
    shared (100.64/10) and documentation ranges; multicast and reserved ranges are
    excluded explicitly because some of them count as "global". An IPv6 address that
    wraps an IPv4 one is judged by the IPv4 address, which is where it leads.
    """
    if not address.is_global or address.is_multicast or address.is_reserved:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
    return True


def allow_any_address(address: IPAddress) -> bool:
    """The policy when private targets are allowed (``FETCHER_ALLOW_PRIVATE=true``,
    ``PROXYMQ_CALLBACK_ALLOW_PRIVATE=true``): no address is refused."""
    return True


def policy_for(allow_private: bool) -> AddressPolicy:
    """The address policy an ``allow_private`` setting asks for."""
    return allow_any_address if allow_private else is_public_address


def resolve_checked(host: str, port: int, policy: AddressPolicy) -> list[Resolved]:
    """Resolve ``host`` and return its addresses, all of them allowed by ``policy``.

    Raises ``socket.gaierror`` when the name does not resolve and
    ``BlockedAddressError`` when any resolved address is refused.
    """
    resolved: list[Resolved] = []
    for family, _type, _proto, _name, sockaddr in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(sockaddr[0])
        if not policy(address):
            raise BlockedAddressError(host, address)
        if (family, sockaddr) not in resolved:
            resolved.append((family, sockaddr))
    if not resolved:
        raise socket.gaierror(socket.EAI_NONAME, f"no IP address for {host}")
    return resolved


# -- connecting only there ------------------------------------------------------------------


def _open_checked(conn: HTTPConnection, policy: AddressPolicy) -> socket.socket:
    """urllib3's ``_new_conn`` with the policy check between resolving and connecting."""
    # _dns_host (the host as given, trailing dot kept) is the name urllib3 resolves too.
    try:
        addresses = resolve_checked(conn._dns_host, conn.port, policy)
    except socket.gaierror as error:
        raise NameResolutionError(conn.host, conn, error) from error
    except UnicodeError:  # a label IDNA cannot encode, e.g. empty ("a..b")
        raise LocationParseError(f"{conn.host!r}, label empty or too long") from None
    sock = _connect_first(conn, addresses)
    sys.audit("http.client.connect", conn, conn.host, conn.port)
    return sock


def _connect_first(conn: HTTPConnection, addresses: list[Resolved]) -> socket.socket:
    """Connect to the first approved address that answers, as create_connection does."""
    last_error: OSError | None = None
    for _family, sockaddr in addresses:
        try:
            return create_connection(
                (sockaddr[0], sockaddr[1]),
                conn.timeout,
                source_address=conn.source_address,
                socket_options=conn.socket_options,
            )
        except TimeoutError as error:
            # The connect timeout is the caller's remaining time: no second try.
            raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out") from error
        except OSError as error:  # refused, unreachable, no IPv6 here: try the next one
            last_error = error
    raise NewConnectionError(
        conn, f"Failed to establish a new connection: {last_error}"
    ) from last_error


class _Guarded:
    """What both connection classes add: a checked socket, and the socket kept for reads."""

    address_policy: AddressPolicy = staticmethod(is_public_address)
    read_socket: socket.socket | None = None

    def _new_conn(self) -> socket.socket:
        return _open_checked(self, self.address_policy)

    def connect(self) -> None:
        super().connect()
        # http.client drops ``sock`` when it hands a closing connection to its response;
        # a caller bounding a whole fetch by a deadline (the fetcher) still needs the
        # socket (for HTTPS, the TLS one) to shorten read timeouts to that deadline.
        self.read_socket = self.sock


class GuardedHTTPConnection(_Guarded, HTTPConnection):
    """Plain HTTP connection that refuses addresses outside ``address_policy``."""


class GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    """HTTPS connection that refuses addresses outside ``address_policy``.

    Only the socket is opened here; TLS and certificate checks against the host name
    stay urllib3's, in ``connect()``.
    """


def _pool_classes(policy: AddressPolicy) -> dict[str, type[HTTPConnectionPool]]:
    """Pool classes whose connections carry ``policy``.

    urllib3 builds connections from a class, not a factory, and refuses unknown pool
    keyword arguments, so the policy is bound as a class attribute of fresh subclasses.
    """
    bound = {"address_policy": staticmethod(policy)}
    http_conn = type("PolicyHTTPConnection", (GuardedHTTPConnection,), bound)
    https_conn = type("PolicyHTTPSConnection", (GuardedHTTPSConnection,), bound)
    http_pool = type("PolicyHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn})
    https_pool = type("PolicyHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})
    return {"http": http_pool, "https": https_pool}


class GuardedAdapter(HTTPAdapter):
    """An HTTPAdapter whose pools open guarded connections only."""

    def __init__(self, policy: AddressPolicy, **kwargs: Any) -> None:
        # Set before super().__init__, which calls init_poolmanager.
        self._policy = policy
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self._policy)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # Through a proxy the guard would check the proxy's address, not the target's.
        raise RuntimeError("the guarded adapter does not support proxies")


def _refuse_all_cookies(session: requests.Session) -> None:
    """One session serves every client: a cookie set for one request must not leak to
    the next."""
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def build_session(policy: AddressPolicy, pool_size: int, *, user_agent: str) -> requests.Session:
    """A pooled Session that connects only to addresses ``policy`` allows.

    ``trust_env=False``: no proxy, netrc or CA settings from the environment, so what is
    requested and how is decided by the code and its configuration alone. ``pool_size``
    connections per host are kept. ``user_agent`` is the caller's to choose: more than
    one part of ProxyMQ builds its session here.
    """
    session = requests.Session()
    session.trust_env = False
    session.headers["User-Agent"] = user_agent
    _refuse_all_cookies(session)
    adapter = GuardedAdapter(policy, pool_connections=32, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def connection(
    scheme: str, host: str, port: int | None, policy: AddressPolicy, timeout: float
) -> HTTPConnection:
    """One guarded connection outside any pool, for a caller that must hold its socket
    from the start (to cut a whole exchange off at a deadline, which per-read timeouts
    cannot: a peer sending one byte per read never trips them). urllib3's connection
    class still does TLS and certificate checks; ``read_socket`` is set on connect."""
    kind = GuardedHTTPSConnection if scheme == "https" else GuardedHTTPConnection
    opened = kind(host, port, timeout=timeout)
    opened.address_policy = policy  # an instance attribute: not bound as a method
    return opened


# -- deadlines on whole exchanges -----------------------------------------------------------


class Deadlines:
    """Sockets to shut at their deadlines (``time.monotonic()`` seconds), by one thread.

    ``add`` registers a socket for the length of one exchange and ``cancel`` takes it
    back; cancel says whether it was still pending, so a caller whose exchange failed or
    came back short knows whether the deadline did it. The thread (started on first use)
    sleeps until the earliest deadline; it is woken only when a new one comes before it.
    Cancelled entries stay in the heap until it is rebuilt, which ``cancel`` does when they
    outnumber the live ones, so with deadlines seconds away none ever comes due: a call
    costs a dictionary entry and a heap push, and no thread switch. Shutting (not closing)
    leaves the file descriptor to its owner: nothing else can be shut by mistake.
    """

    def __init__(self) -> None:
        self._wake = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int]] = []
        self._due: dict[int, tuple[float, socket.socket]] = {}
        self._numbers = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, when: float, sock: socket.socket) -> int:
        """Shut ``sock`` at ``when`` unless cancelled first; the handle to cancel it by."""
        handle = next(self._numbers)
        with self._wake:
            self._due[handle] = (when, sock)
            heapq.heappush(self._heap, (when, handle))
            if self._heap[0][1] == handle:  # earlier than the thread's sleep: wake it
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="proxymq-deadlines", daemon=True
                    )
                    self._thread.start()
                self._wake.notify()
        return handle

    def cancel(self, handle: int) -> bool:
        """Take the socket back: True if its deadline had not come (it was not shut)."""
        with self._wake:
            pending = self._due.pop(handle, None) is not None
            if len(self._heap) > 2 * len(self._due) + 64:
                self._heap = [(when, number) for number, (when, _) in self._due.items()]
                heapq.heapify(self._heap)
        return pending

    def _run(self) -> None:
        while True:
            with self._wake:
                due = self._take_due()
                while not due:
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._wake.wait(wait)
                    due = self._take_due()
            for sock in due:
                shut(sock)

    def _take_due(self) -> list[socket.socket]:
        now, due = time.monotonic(), []
        while self._heap and self._heap[0][0] <= now:
            entry = self._due.pop(heapq.heappop(self._heap)[1], None)
            if entry is not None:
                due.append(entry[1])
        return due


DEADLINES = Deadlines()
"""The process's one deadline thread: single calls, batch calls and job callbacks."""


def shut(sock: socket.socket) -> None:
    """Shut both directions under any blocked read or write. For a TLS socket, the plain
    socket's shutdown: the TLS object stays as it is for its owner's thread to close."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Bound:
    """One thread's exchange through a ``BoundedAdapter``, bounded by ``when``: every
    connection it sends a request on is registered with ``DEADLINES`` until released."""

    def __init__(self, when: float) -> None:
        self.when = when
        self.cut = False
        self._handles: list[int] = []

    def register(self, sock: socket.socket) -> int:
        handle = DEADLINES.add(self.when, sock)
        self._handles.append(handle)
        return handle

    def release(self, handle: int) -> None:
        if handle in self._handles:
            self._handles.remove(handle)
            self.cut |= not DEADLINES.cancel(handle)

    def end(self) -> bool:
        """Cancel what is still registered; whether the deadline cut any of it."""
        for handle in list(self._handles):
            self.release(handle)
        return self.cut


_bounds = threading.local()


@contextlib.contextmanager
def bounded(when: float) -> Iterator[Bound]:
    """Within it, this thread's requests through a ``BoundedAdapter`` are cut off at
    ``when`` (``time.monotonic()``): their head, body and answer, whatever trickles.
    ``Bound.cut`` (after the block, or ``Bound.end()`` inside it) says if one was."""
    bound = Bound(when)
    _bounds.current = bound
    try:
        yield bound
    finally:
        _bounds.current = None
        bound.end()


class _Registering:
    """A urllib3 connection that registers its socket with the thread's ``bounded``
    deadline before it sends a request, and is taken back when the pool gets it back
    (``_ReleasingPool``): before another thread can take it, so a late deadline never
    shuts another call's socket."""

    _bound: Bound | None = None
    _deadline: int | None = None

    def request(self, *args: Any, **kwargs: Any) -> None:
        bound = getattr(_bounds, "current", None)
        if bound is not None:
            if self.sock is None:  # a new connection: connect now, to hold its socket
                self.connect()
            self._bound, self._deadline = bound, bound.register(self.sock)
        super().request(*args, **kwargs)

    def release_deadline(self) -> None:
        if self._bound is not None and self._deadline is not None:
            self._bound.release(self._deadline)
        self._bound = self._deadline = None


class _ReleasingPool:
    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            conn.release_deadline()
        super()._put_conn(conn)


class _BoundedHTTPConnection(_Registering, HTTPConnection):
    pass


class _BoundedHTTPSConnection(_Registering, HTTPSConnection):
    pass


class _BoundedHTTPConnectionPool(_ReleasingPool, HTTPConnectionPool):
    ConnectionCls = _BoundedHTTPConnection


class _BoundedHTTPSConnectionPool(_ReleasingPool, HTTPSConnectionPool):
    ConnectionCls = _BoundedHTTPSConnection


class BoundedAdapter(HTTPAdapter):
    """An HTTPAdapter whose requests ``bounded`` can cut off at a deadline."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _BoundedHTTPConnectionPool,
            "https": _BoundedHTTPSConnectionPool,
        }

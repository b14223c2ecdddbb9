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
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import socket
import sys
from collections.abc import Callable
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

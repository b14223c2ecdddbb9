"""A requests Session whose connections only open to addresses the guard allows.

The check lives in the connection, at the moment a socket is opened: urllib3's own
``_new_conn`` resolves the name and connects in one step, and our override resolves
with ``fetcher.guard.resolve_checked`` and connects to exactly the addresses it
approved. So there is one DNS lookup per new connection and no window between check and
connect for DNS rebinding. Every redirect hop that needs a new connection goes through
the same path; a pooled keep-alive connection is reused only for the host it was opened
(and checked) for. TLS still verifies the certificate against the host *name*, because
only the socket's peer address is chosen here.

The price is overriding ``_new_conn``, a private urllib3 method whose signature has been
stable since urllib3 1.x; ``tests/fetcher`` exercise it against a real server, so an
urllib3 upgrade that changes it fails the tests instead of silently skipping the guard.

Residual risk: name resolution itself is not bounded by ``FETCHER_TIMEOUT``; it is
bounded by the system resolver's own timeout and attempts (``/etc/resolv.conf``).
"""

from __future__ import annotations

import http.cookiejar
import socket
import sys
from typing import Any

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

from fetcher.guard import AddressPolicy, Resolved, is_public_address, resolve_checked

USER_AGENT = "proxymq-fetcher/0.1"


def _open_checked(conn: HTTPConnection, policy: AddressPolicy) -> socket.socket:
    """urllib3's ``_new_conn`` with the guard between resolving and connecting."""
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
            # The connect timeout is the fetch's remaining time: no second try.
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
        # the fetcher still needs the socket (for HTTPS, the TLS one) to shorten read
        # timeouts to its deadline.
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
    """One session serves every client: a cookie set for one fetch must not leak to the next."""
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def build_session(policy: AddressPolicy, pool_size: int) -> requests.Session:
    """The one pooled Session of this process.

    ``trust_env=False``: no proxy, netrc or CA settings from the environment, so what is
    fetched and how is decided by the code and ``FetcherConfig`` alone. ``pool_size``
    connections per host are kept, enough for a full batch against one host.
    """
    session = requests.Session()
    session.trust_env = False
    session.headers["User-Agent"] = USER_AGENT
    _refuse_all_cookies(session)
    adapter = GuardedAdapter(policy, pool_connections=32, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session

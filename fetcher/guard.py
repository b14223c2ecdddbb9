"""Address safety: which IP addresses the fetcher may connect to.

A URL fetcher reachable by clients is a server-side request forgery tool unless it
refuses internal addresses: cloud metadata (169.254.169.254), the pod's own loopback,
the cluster's private ranges. The rule is applied to *resolved* addresses, never to the
host name, because any name can resolve to 127.0.0.1.

``resolve_checked`` is called by the connection itself (see ``fetcher.transport``) with
the address it is about to connect to, so the address checked is the address used: a
DNS answer that changes between a check and the connect (DNS rebinding) cannot slip
through. If a name resolves to several addresses and any one is refused, the whole name
is refused, so a mixed answer cannot be used to reach an internal address on a retry.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy: TypeAlias = Callable[[IPAddress], bool]
"""Answers True when connecting to the address is allowed."""

Resolved: TypeAlias = tuple[socket.AddressFamily, tuple]
"""An address family and the socket address to connect to."""


class BlockedAddressError(Exception):
    """The host resolved to an address the policy refuses.

    Deliberately not an ``OSError``: urllib3 and requests wrap and retry ``OSError``s
    from a connect, while this must reach the fetcher unchanged and at once.
    """

    def __init__(self, host: str, address: IPAddress) -> None:
        super().__init__(f"{host} resolves to refused address {address}")
        self.host = host
        self.address = address


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
    excluded explicitly because some of them count as "global".
    """
    if not address.is_global or address.is_multicast or address.is_reserved:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
    return True


def allow_any_address(address: IPAddress) -> bool:
    """The policy with ``FETCHER_ALLOW_PRIVATE=true``: no address is refused."""
    return True


def policy_for(allow_private: bool) -> AddressPolicy:
    """The address policy a configuration asks for."""
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

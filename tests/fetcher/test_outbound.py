"""proxymq.outbound: which addresses are refused, and that the session checks at connect.

These live with the fetcher tests for their fixtures (``fake_dns``, ``loopback_only``,
local servers); the fetcher and the job callbacks both build their sessions here.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from proxymq.outbound import (
    BlockedAddressError,
    allow_any_address,
    build_session,
    is_public_address,
    policy_for,
    resolve_checked,
)

REFUSED = [
    "127.0.0.1",  # loopback
    "127.255.0.9",
    "10.0.0.1",  # RFC 1918
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",  # link-local: cloud metadata
    "0.0.0.0",  # unspecified
    "100.64.0.1",  # shared address space (carrier-grade NAT)
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "192.0.2.10",  # documentation
    "::1",
    "::",
    "fe80::1",  # link-local
    "fc00::1",  # ULA
    "fd12:3456::1",
    "ff02::1",  # multicast
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "2002:7f00:1::",  # 6to4 wrapping 127.0.0.1
    "2002:a00:1::",  # 6to4 wrapping 10.0.0.1
]
ALLOWED = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001::"]


@pytest.mark.parametrize("address", REFUSED)
def test_internal_addresses_are_refused_by_default(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is False


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is True


def test_allow_private_turns_the_check_off() -> None:
    assert policy_for(True) is allow_any_address
    assert policy_for(False) is is_public_address
    assert allow_any_address(ipaddress.ip_address("127.0.0.1")) is True


def test_a_name_resolving_to_loopback_is_refused() -> None:
    with pytest.raises(BlockedAddressError) as caught:
        resolve_checked("localhost", 80, is_public_address)
    assert caught.value.address.is_loopback


def test_a_name_is_refused_if_any_of_its_addresses_is(fake_dns) -> None:
    fake_dns.answers["mixed.test"] = [["8.8.8.8", "10.0.0.1"]]
    with pytest.raises(BlockedAddressError) as caught:
        resolve_checked("mixed.test", 80, is_public_address)
    assert str(caught.value.address) == "10.0.0.1"


def test_allowed_addresses_are_returned_deduplicated(fake_dns) -> None:
    fake_dns.answers["public.test"] = [["8.8.8.8", "8.8.8.8", "2001:4860:4860::8888"]]
    resolved = resolve_checked("public.test", 443, is_public_address)
    assert resolved == [
        (socket.AF_INET, ("8.8.8.8", 443)),
        (socket.AF_INET6, ("2001:4860:4860::8888", 443, 0, 0)),
    ]


def test_an_unknown_name_raises_gaierror(fake_dns) -> None:
    with pytest.raises(socket.gaierror):
        resolve_checked("nowhere.test", 80, is_public_address)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/",
        "http://localhost/",
        "http://LocalHost/",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
        "http://2130706433/",  # 127.0.0.1 as one decimal number
        "http://0x7f.1/",  # 127.0.0.1, hex and short form
        "https://127.0.0.1/",
        "http://internal.test/",
        "http://mixed.test/",
    ],
)
def test_the_session_refuses_before_connecting(url: str, fake_dns, loopback_only) -> None:
    fake_dns.answers["internal.test"] = [["10.1.2.3"]]
    fake_dns.answers["mixed.test"] = [["8.8.8.8", "192.168.0.10"]]
    session = build_session(is_public_address, pool_size=1, user_agent="test")
    with pytest.raises(BlockedAddressError):
        session.get(url, timeout=5)
    assert loopback_only == [], "no connection may be attempted to a refused address"


def test_a_session_allowing_private_addresses_reaches_them(local_server) -> None:
    session = build_session(allow_any_address, pool_size=1, user_agent="test")
    assert session.get(local_server.url("/ok"), timeout=5).status_code == 200
    assert local_server.hits == [("GET", "/ok")]


def test_the_session_carries_the_callers_user_agent() -> None:
    session = build_session(is_public_address, pool_size=1, user_agent="proxymq-test/1")
    assert session.headers["User-Agent"] == "proxymq-test/1"


def test_the_session_refuses_proxies(local_server) -> None:
    # Through a proxy the check would see the proxy's address, not the target's.
    session = build_session(allow_any_address, pool_size=1, user_agent="test")
    proxy = local_server.url("/")
    with pytest.raises(RuntimeError, match="proxies"):
        session.get("http://example.test/", proxies={"http": proxy}, timeout=5)
    assert local_server.hits == []

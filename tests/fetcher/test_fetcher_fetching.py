"""Fetching from real local servers: results, redirects, limits, timeouts, the guard per hop.

The servers listen on loopback, so these tests allow private addresses, either wholly
(``FETCHER_ALLOW_PRIVATE=true``) or with the default rule plus one exception for
127.0.0.1 (``default_rule_but_local_server``), which keeps 127.0.0.2 and every other
internal address refused and lets a test watch the guard stop a redirect.
"""

from __future__ import annotations

import ipaddress
import time
from urllib.parse import quote

import pytest

from fetcher.config import FetcherConfig
from fetcher.fetching import Fetcher
from fetcher.web import build_fetcher, create_app
from proxymq.outbound import IPAddress, is_public_address

LOCAL_ONLY = ipaddress.ip_address("127.0.0.1")


def default_rule_but_local_server(address: IPAddress) -> bool:
    """The default policy, except that the test server's 127.0.0.1 is allowed."""
    return address == LOCAL_ONLY or is_public_address(address)


def make_fetcher(**limits: float) -> Fetcher:
    return build_fetcher(FetcherConfig(allow_private=True, **limits))


def redirect(server, to: str, code: int = 302) -> str:
    return server.url(f"/redirect?code={code}&to={quote(to, safe='')}")


def test_fetch_answers_the_full_shape(local_server) -> None:
    client = create_app(FetcherConfig(allow_private=True)).test_client()
    url = local_server.url("/ok")
    response = client.post("/fetch", json={"url": url})
    assert response.status_code == 200
    body = response.get_json()
    assert body == {
        "url": url,
        "final_url": url,
        "status": 200,
        "content_type": "text/plain",
        "size": len(b"hello world"),
        "elapsed_ms": body["elapsed_ms"],
    }
    assert isinstance(body["elapsed_ms"], float) and body["elapsed_ms"] > 0
    assert local_server.hits == [("GET", "/ok")]


def test_a_target_error_status_is_not_a_fetch_error(local_server) -> None:
    result = make_fetcher().fetch(local_server.url("/status/404"))
    assert (result.status, result.error) == (404, None)


def test_head_reads_no_body(local_server) -> None:
    result = make_fetcher().fetch(local_server.url("/bytes/5000"), "HEAD")
    assert (result.status, result.size, result.error) == (200, 0, None)
    assert local_server.hits == [("HEAD", "/bytes/5000")]


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_followed(local_server, code: int) -> None:
    url = redirect(local_server, "/ok", code)
    result = make_fetcher().fetch(url)
    assert result.url == url
    assert result.final_url == local_server.url("/ok")
    assert (result.status, result.size, result.error) == (200, 11, None)


def test_a_redirect_to_another_allowed_host_is_followed(local_server, other_server) -> None:
    result = make_fetcher().fetch(redirect(local_server, other_server.url("/ok")))
    assert (result.final_url, result.status) == (other_server.url("/ok"), 200)
    assert other_server.hits == [("GET", "/ok")]


def test_five_redirects_are_followed(local_server) -> None:
    result = make_fetcher().fetch(local_server.url("/chain/5"))
    assert (result.status, result.error) == (200, None)
    assert result.final_url == local_server.url("/chain/0")


def test_a_sixth_redirect_is_refused(local_server) -> None:
    result = make_fetcher().fetch(local_server.url("/chain/6"))
    assert (result.status, result.error) == (None, "too-many-redirects")
    assert len(local_server.hits) == 6, "the sixth target is never requested"


def test_a_redirect_to_another_scheme_is_refused(local_server) -> None:
    result = make_fetcher().fetch(redirect(local_server, "file:///etc/passwd"))
    assert (result.status, result.error) == (None, "bad-redirect")
    assert result.final_url == "file:///etc/passwd"


def test_each_redirect_hop_is_checked_by_the_guard(local_server, other_server) -> None:
    # 127.0.0.1 is allowed and redirects to 127.0.0.2, which the default rule refuses.
    fetcher = build_fetcher(FetcherConfig(), address_policy=default_rule_but_local_server)
    target = other_server.url("/ok")
    result = fetcher.fetch(redirect(local_server, target))
    assert (result.status, result.error) == (None, "blocked-address")
    assert result.final_url == target
    assert len(local_server.hits) == 1
    assert other_server.hits == [], "the refused host must never be contacted"


@pytest.mark.parametrize(
    "target",
    ["http://[::1]:9/", "http://localhost.test/", "http://10.0.0.1/", "http://169.254.169.254/"],
)
def test_a_redirect_to_an_internal_address_is_refused(
    local_server, fake_dns, loopback_only, target: str
) -> None:
    fake_dns.answers["localhost.test"] = [["127.0.0.2"]]
    fetcher = build_fetcher(FetcherConfig(), address_policy=default_rule_but_local_server)
    result = fetcher.fetch(redirect(local_server, target))
    assert (result.final_url, result.error) == (target, "blocked-address")
    assert loopback_only == [("127.0.0.1", local_server.port)], "only the first hop connects"


def test_the_checked_address_is_the_connected_one(local_server, fake_dns, loopback_only) -> None:
    # rebind.test answers 127.0.0.1 first and 127.0.0.2 afterwards. One lookup per
    # connection: the first fetch connects where it checked, the next one re-checks.
    fake_dns.answers["rebind.test"] = [["127.0.0.1"], ["127.0.0.2"]]
    fetcher = build_fetcher(FetcherConfig(), address_policy=default_rule_but_local_server)
    url = f"http://rebind.test:{local_server.port}/ok"

    first = fetcher.fetch(url)
    assert (first.status, first.error) == (200, None)
    assert fake_dns.lookups["rebind.test"] == 1
    assert loopback_only == [("127.0.0.1", local_server.port)]

    second = fetcher.fetch(url)
    assert second.error == "blocked-address"
    assert loopback_only == [("127.0.0.1", local_server.port)], "no connect after refusal"


def test_a_body_at_the_limit_is_fine(local_server) -> None:
    result = make_fetcher(max_bytes=1000).fetch(local_server.url("/bytes/1000"))
    assert (result.status, result.size, result.error) == (200, 1000, None)


def test_a_declared_length_over_the_limit_is_refused_unread(local_server) -> None:
    result = make_fetcher(max_bytes=1000).fetch(local_server.url("/bytes/1001"))
    assert (result.status, result.size, result.error) == (None, 0, "too-large")


def test_an_undeclared_body_stops_just_past_the_limit(local_server) -> None:
    result = make_fetcher(max_bytes=1000).fetch(local_server.url("/stream/500000"))
    assert (result.status, result.error) == (None, "too-large")
    assert 1000 < result.size <= 1001


def test_a_dripping_server_is_cut_at_the_deadline(local_server) -> None:
    # A byte every 50 ms for 10 s: no single read ever times out, the deadline must.
    started = time.monotonic()
    result = make_fetcher(timeout=1.0).fetch(local_server.url("/drip?every=0.05&count=200"))
    elapsed = time.monotonic() - started
    assert (result.status, result.error) == (None, "timeout")
    assert result.size > 0
    assert 0.9 <= elapsed < 1.8
    assert 900 <= result.elapsed_ms < 1800


def test_a_server_stalling_mid_body_is_cut_at_the_deadline(local_server) -> None:
    # Headers come after 0.6 s of the 1 s budget; the stalled read must end at 1 s, not
    # a full read timeout (the 1 s left when the request started) after it began.
    started = time.monotonic()
    result = make_fetcher(timeout=1.0).fetch(local_server.url("/stall?wait=0.6&s=5"))
    elapsed = time.monotonic() - started
    assert (result.error, result.size) == ("timeout", 1)
    assert 0.9 <= elapsed < 1.45


def test_a_server_slow_to_answer_is_cut_at_the_deadline(local_server) -> None:
    started = time.monotonic()
    result = make_fetcher(timeout=0.5).fetch(local_server.url("/sleep?s=5"))
    assert result.error == "timeout"
    assert time.monotonic() - started < 1.3


def test_the_deadline_covers_all_redirect_hops(local_server) -> None:
    # Two hops of 0.4 s each: each alone fits in 0.6 s, together they do not.
    second = redirect(local_server, "/ok") + "&sleep=0.4"
    first = redirect(local_server, second) + "&sleep=0.4"
    started = time.monotonic()
    result = make_fetcher(timeout=0.6).fetch(first)
    assert result.error == "timeout"
    assert time.monotonic() - started < 1.0


def test_a_refused_connection(closed_port: int) -> None:
    result = make_fetcher().fetch(f"http://127.0.0.1:{closed_port}/")
    assert (result.status, result.error) == (None, "connection-refused")


def test_a_name_that_does_not_resolve(fake_dns) -> None:
    result = make_fetcher().fetch("http://nowhere.test/")
    assert (result.status, result.error) == (None, "dns-failure")


def test_cookies_do_not_leak_between_fetches(local_server) -> None:
    fetcher = make_fetcher()
    assert fetcher.fetch(local_server.url("/cookie")).status == 200
    assert fetcher.fetch(local_server.url("/ok")).status == 200
    assert len(fetcher.session.cookies) == 0
    assert local_server.cookies == [None, None]


def test_https_verifies_the_certificate(tls_server) -> None:
    result = make_fetcher().fetch(tls_server.url("/ok"))
    assert (result.status, result.error) == (None, "tls-error")


def test_https_checks_the_name_while_connecting_to_the_checked_address(
    tls_server, tls_certificate, loopback_only
) -> None:
    # The guard picks the socket's peer (127.0.0.1); TLS still verifies "localhost".
    fetcher = make_fetcher()
    fetcher.session.verify = str(tls_certificate[0])
    result = fetcher.fetch(tls_server.url("/ok", host="localhost"))
    assert (result.status, result.size, result.error) == (200, 11, None)
    assert loopback_only == [("127.0.0.1", tls_server.port)]


def test_https_stalls_are_cut_at_the_deadline(tls_server, tls_certificate) -> None:
    fetcher = make_fetcher(timeout=1.0)
    fetcher.session.verify = str(tls_certificate[0])
    started = time.monotonic()
    result = fetcher.fetch(tls_server.url("/stall?wait=0.6&s=5"))
    assert (result.error, result.size) == ("timeout", 1)
    assert time.monotonic() - started < 1.45

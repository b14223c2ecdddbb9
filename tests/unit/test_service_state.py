"""The gateway's reading of the services' announced states (``gateway.service_state``)
and the workers' drain rate (``workers.announcer.DrainRate``), on a clock of the test's."""

from __future__ import annotations

import json

import amqp
import pytest

from gateway.service_state import MAX_WORKERS, ServiceStates
from proxymq import status as wire
from workers.announcer import DrainRate


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def message(user: str = "workers", exchange: str = wire.EXCHANGE, **fields) -> amqp.Message:
    status = {
        "service": "svc",
        "worker": "w1",
        "sent_at": 5000.0,  # the worker's clock: far from the gateway's
        "breaker_open_until": None,
        "paused_until": None,
        "drain_rate": 10.0,
        "depth": 0,
        "held": 0,
        **fields,
    }
    msg = amqp.Message(json.dumps(status).encode(), user_id=user)
    msg.delivery_info = {"exchange": exchange, "routing_key": ""}
    return msg


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def states(clock):
    return ServiceStates(frozenset({"workers"}), set(), clock=clock)


def test_unknown_service_is_never_refused(states):
    assert states.refusal("svc", 0.001) is None


def test_open_breaker_refuses_until_its_end_whatever_the_clocks(states, clock):
    states.receive(message(sent_at=5000.0, breaker_open_until=5030.0))
    error = states.refusal("svc", 120)
    assert (error.status, error.code, error.retry_after) == (503, "service-unavailable", 30)
    clock.now += 29.5
    states.receive(message(sent_at=5029.5, breaker_open_until=5030.0))
    assert states.refusal("svc", 120).retry_after == 1  # rounded up, at least 1
    clock.now += 1
    assert states.refusal("svc", 120) is None


def test_pause_refuses_like_the_breaker(states):
    states.receive(message(paused_until=5004.2))
    assert states.refusal("svc", 120).retry_after == 5


def test_backlog_beyond_the_deadline_is_unreachable(states):
    states.receive(message(depth=295, held=5, drain_rate=10.0))  # 30 s of work
    error = states.refusal("svc", 5)
    assert (error.code, error.retry_after) == ("deadline-unreachable", 30)
    assert states.refusal("svc", 60) is None
    assert states.wait("svc") == pytest.approx(30.0)


def test_a_prioritized_request_is_never_refused_for_its_wait(states):
    states.receive(message(depth=300, drain_rate=10.0))
    assert states.refusal("svc", 5, prioritized=True) is None
    states.receive(message(depth=300, drain_rate=10.0, breaker_open_until=5060.0))
    assert states.refusal("svc", 5, prioritized=True).code == "service-unavailable"


def test_rates_of_all_live_workers_add_up(states, clock):
    states.receive(message(worker="w1", depth=300, drain_rate=10.0))
    states.receive(message(worker="w2", depth=300, drain_rate=20.0))
    assert states.wait("svc") == pytest.approx(10.0)
    clock.now += 8
    states.receive(message(worker="w2", depth=300, drain_rate=20.0))
    clock.now += 3  # w1 last announced 11 s ago: gone
    states.receive(message(worker="w2", depth=300, drain_rate=20.0))
    assert states.wait("svc") == pytest.approx(15.0)


def test_the_backlog_is_carried_forward_along_its_trend(states, clock):
    states.receive(message(depth=300, drain_rate=10.0))
    clock.now += 2
    states.receive(message(depth=280, drain_rate=10.0))  # draining 10 a second
    assert states.wait("svc") == pytest.approx(28.0)
    clock.now += 1.5
    assert states.wait("svc") == pytest.approx(26.5)
    clock.now += 2
    states.receive(message(depth=300, drain_rate=10.0))  # filling again, 20/3.5 s
    clock.now += 1
    assert states.wait("svc") == pytest.approx((300 + 20 / 3.5) / 10)


def test_no_drain_measured_means_no_estimate_and_no_refusal(states):
    states.receive(message(depth=1000, drain_rate=0.0))
    assert states.wait("svc") is None
    assert states.refusal("svc", 0.1) is None


def test_a_state_older_than_10_s_is_ignored(states, clock):
    states.receive(message(breaker_open_until=5600.0, depth=1000))
    assert states.refusal("svc", 1) is not None
    clock.now += wire.MAX_AGE + 0.1
    assert states.refusal("svc", 1) is None
    assert states.wait("svc") is None


def test_only_reply_users_and_only_through_the_exchange(states):
    states.receive(message(user="intruder", breaker_open_until=5600.0))
    states.receive(message(user=None, breaker_open_until=5600.0))
    states.receive(message(exchange="", breaker_open_until=5600.0))
    assert states.refusal("svc", 1) is None
    states.receive(message(breaker_open_until=5600.0))
    assert states.refusal("svc", 1) is not None


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"service": "svc"}',
        json.dumps(
            {"service": "svc", "worker": "w", "sent_at": "now", "drain_rate": 1, "depth": 1}
        ).encode(),
        json.dumps(
            {"service": "svc", "worker": "w", "sent_at": 1, "drain_rate": -1, "depth": 1}
        ).encode(),
        json.dumps(
            {"service": "s/../x", "worker": "w", "sent_at": 1, "drain_rate": 1, "depth": 1}
        ).encode(),
        b"{" + b" " * wire.MAX_BYTES + b"}",
    ],
)
def test_malformed_statuses_are_dropped(states, body):
    msg = amqp.Message(body, user_id="workers")
    msg.delivery_info = {"exchange": wire.EXCHANGE}
    states.receive(msg)
    assert states.state("svc") is None and states.state("s/../x") is None


def test_a_flood_of_invented_workers_is_capped(clock):
    states = ServiceStates(None, set(), clock=clock)
    for number in range(MAX_WORKERS + 50):
        states.receive(message(worker=f"w{number}", service=f"s{number % 7}"))
    assert states._count() == MAX_WORKERS


def test_an_announced_service_becomes_a_known_metric_label(clock):
    known: set[str] = set()
    ServiceStates(None, known, clock=clock).receive(message())
    assert known == {"svc_requests"}


def test_drain_rate_is_unknown_until_a_round_with_a_backlog_throughout_then_smooths(clock):
    rate = DrainRate(clock)
    clock.now += 2
    rate.add(2)
    assert rate.sample(backlogged=False) == 0  # arrivals, no backlog: no estimate
    clock.now += 2
    rate.add(6)  # the backlog began somewhere in this round: arrivals still
    assert rate.sample(backlogged=True) == 0
    clock.now += 2
    rate.add(20)
    assert rate.sample(backlogged=True) == pytest.approx(10.0)  # capacity, whole
    clock.now += 2
    rate.add(2)
    assert rate.sample(backlogged=False) == pytest.approx(10.0)  # idle: capacity kept
    clock.now += 0.1  # a change announced at once: too soon to be a round
    rate.add(100)
    assert rate.sample(backlogged=True) == pytest.approx(10.0)
    clock.now += 2
    rate.add(0)
    assert 10 < rate.sample(backlogged=True) < 30  # the burst, spread, not all at once
    for _ in range(20):  # the downstream slows down to 2 a second
        clock.now += 2
        rate.add(4)
        rate.sample(backlogged=True)
    assert rate.rate == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize(
    "fields",
    [
        {"depth": 10**400},  # JSON allows any integer; no float holds it
        {"sent_at": 10**400},
        {"depth": 1e308, "held": 1e308},  # finite each, their sum is not
    ],
)
def test_absurd_numbers_never_raise_on_the_reader(states, fields):
    """The reader greenlet also carries the replies: an exception there drops the link."""
    states.receive(message(**fields))
    states.receive(message(**fields))
    assert states.refusal("svc", 30.0) is None or states.refusal("svc", 30.0).status == 503


def test_a_vanishing_drain_rate_gives_a_finite_wait(states):
    states.receive(message(depth=10**12, drain_rate=1e-300))
    assert states.wait("svc") == wire.MAX_NUMBER  # JSON has no infinity (eta_seconds)
    assert states.refusal("svc", 30.0).retry_after == 86_400


def test_retry_after_stays_within_a_day(states):
    states.receive(message(sent_at=0.0, breaker_open_until=1e12))
    refusal = states.refusal("svc", 30.0)
    assert refusal.status == 503 and int(refusal.retry_after) <= 86_400

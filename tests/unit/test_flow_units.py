"""The flow control's pure parts: settings, FlowState, Retry-After, the retry rule."""

from __future__ import annotations

import math
import time
from email.utils import formatdate

import pytest
import redis

from proxymq.config import ConfigError, Rate, WorkerConfig
from workers.flow import retry_after
from workers.flow.adaptive import PROBE_CALLS, LocalLimit
from workers.flow.budget import RetryBudget
from workers.flow.leases import Leases
from workers.flow.rate import RateLimit
from workers.flow.shared import DOWN, Shared
from workers.flow.state import FlowState


def config(**env: str) -> WorkerConfig:
    base = {"PROXYMQ_SERVICE": "api", "PROXYMQ_DOWNSTREAM_URL": "http://127.0.0.1:9"}
    return WorkerConfig.from_env({**base, **env})


def test_flow_settings_are_read_per_service():
    service = config(
        PROXYMQ_RESULT_URL="redis://127.0.0.1:6379/0",
        PROXYMQ_MAX_CONCURRENCY="auto",
        PROXYMQ_RATE_LIMIT="120/m",
        PROXYMQ_RETRIES="2",
        PROXYMQ_RETRY_BUDGET="0.5",
    ).services["api"]
    assert service.max_concurrency == "auto"
    assert service.rate_limit == Rate(120, 60.0)
    assert service.rate_limit.per_second == 2
    assert (service.retries, service.retry_budget) == (2, 0.5)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROXYMQ_MAX_CONCURRENCY", "-1"),
        ("PROXYMQ_MAX_CONCURRENCY", "automatic"),
        ("PROXYMQ_RATE_LIMIT", "10"),
        ("PROXYMQ_RATE_LIMIT", "0/s"),
        ("PROXYMQ_RETRY_BUDGET", "1.5"),
        ("PROXYMQ_RETRIES", "many"),
        ("PROXYMQ_BREAKER_OPEN", "0"),
    ],
)
def test_a_bad_flow_setting_names_its_variable(variable, value):
    with pytest.raises(ConfigError) as error:
        config(PROXYMQ_RESULT_URL="redis://127.0.0.1:6379/0", **{variable: value})
    assert error.value.variable == variable


def test_min_concurrency_above_the_auto_maximum_is_refused():
    with pytest.raises(ConfigError) as error:
        config(PROXYMQ_MIN_CONCURRENCY="10", PROXYMQ_AUTO_MAX_CONCURRENCY="5")
    assert error.value.variable == "PROXYMQ_MIN_CONCURRENCY"


def test_flow_state_reports_a_pause_until_it_is_over_and_tells_its_listeners():
    state = FlowState("api")
    seen = []
    state.on_change(lambda: seen.append((state.paused_until(), state.breaker_open_until())))
    until = time.time() + 30
    assert state.pause(until)
    assert not state.pause(until - 10)  # a shorter pause changes nothing
    state.open_breaker(until + 5)
    assert seen == [(until, None), (until, until + 5)]
    assert state.paused_until() == until
    state.pause(time.time() + 60)
    state.open_breaker(0.0)
    assert state.breaker_open_until() is None
    past = FlowState("other")
    past.pause(time.time() - 1)
    assert past.paused_until() is None


def test_a_listener_that_fails_does_not_stop_the_others():
    state = FlowState("api")
    seen = []
    state.on_change(lambda: 1 / 0)
    state.on_change(lambda: seen.append(state.paused_until()))
    until = time.time() + 5
    state.pause(until)
    assert seen == [until]


@pytest.mark.parametrize(("value", "low", "high"), [("5", 5, 5), ("0", 0, 0), (None, 18, 21)])
def test_retry_after_in_seconds_or_as_a_date(value, low, high):
    if value is None:  # a date 20 s from now, made when the test runs
        value = formatdate(time.time() + 20, usegmt=True)
    seconds = retry_after.seconds([("Retry-After", value)])
    assert low <= seconds <= high


@pytest.mark.parametrize("value", ["soon", "-5", "1.5", "", "Wed, 99 Foo 2020"])
def test_a_retry_after_that_names_no_wait_is_ignored(value):
    assert retry_after.seconds([("retry-after", value)]) is None


@pytest.mark.parametrize("redis_url", [None, "redis://127.0.0.1:1/0"])
def test_without_redis_the_retry_budget_is_the_workers_own(redis_url):
    """No ``PROXYMQ_RESULT_URL``, or a Redis that cannot be reached: the same rule on this
    worker's calls (0.2 of 10 calls: 2 retries), never an error."""
    shared = Shared(redis_url, ["api"]) if redis_url else None
    budget = RetryBudget(0.2, shared, "api")
    for _ in range(10):
        budget.called()
    assert [budget.spend() for _ in range(3)] == [True, True, False]


def test_a_retry_budget_redis_refuses_falls_back_to_the_workers_own():
    """A key of another type (a hostile or mistaken peer): the call is not failed."""
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    name = f"budget-{time.time_ns()}"
    client.set(f"proxymq:flow:{{{name}}}:budget-calls", "x", ex=30)
    budget = RetryBudget(0.2, Shared("redis://127.0.0.1:6379/0", [name]), name)
    for _ in range(10):
        budget.called()
    assert [budget.spend() for _ in range(3)] == [True, True, False]


def test_auto_cuts_once_for_the_calls_of_an_overshoot_and_again_at_the_next_failure():
    """The failures of the calls in flight at a cut are one signal: one cut (to the calls
    still in flight). A call started after it that fails cuts again however soon it
    comes: a 429 is back in a millisecond, and a cool-down timed to a call let the
    freed slots fail dozens of times each after the service's capacity halved."""
    name = f"auto-{time.time_ns()}"
    store = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    store.hset(f"proxymq:flow:{{{name}}}:auto", "limit", 8)
    leases = Leases(Shared("redis://127.0.0.1:6379/0", [name]), name, None, 5.0, auto=(1, 100))
    held = [leases.acquire() for _ in range(8)]
    assert all(isinstance(lease, str) for lease in held) and leases.acquire() is False
    for lease in held:
        leases.release(lease, ok=False)
    assert leases.limit == 7
    leases.release(leases.acquire(), ok=False)
    assert leases.limit == 3.5


def test_a_call_started_after_a_cut_that_fails_cuts_again_while_older_calls_are_out():
    """A service's capacity halved: calls started under the cut limit fail at once, long
    before the calls in flight at the cut come back; each such failure is a new signal
    (counting a round of calls let 11 to 15 fast 429s through each time)."""
    name = f"auto-{time.time_ns()}"
    store = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    store.hset(f"proxymq:flow:{{{name}}}:auto", mapping={"limit": 8, "probing": 1})
    leases = Leases(Shared("redis://127.0.0.1:6379/0", [name]), name, None, 5.0, auto=(1, 100))
    held = [leases.acquire() for _ in range(8)]
    leases.release(held.pop(), ok=False)
    assert leases.limit == 7
    leases.release(held.pop(), ok=True)  # an older call answered: a slot for a new one
    leases.release(leases.acquire(), ok=False)
    assert leases.limit == 6  # to the 6 older calls still out
    leases.release(held.pop(), ok=False)  # an older call's failure: the same signal
    assert leases.limit == 6


def test_without_redis_auto_cuts_once_per_round_of_calls():
    local = LocalLimit(8.0, 1, 100)
    assert [local.adjust(False, busy) for busy in range(7, -1, -1)] == [7.0] * 8
    assert local.adjust(False, 0) == 3.5


def test_after_a_cut_auto_probes_slowly_near_it_and_faster_the_longer_none_comes():
    """Near a steady capacity, one call more every PROBE_CALLS rounds (a probe past it
    costs one failed call); a capacity that came back is found again in well under the
    time that pace would take."""
    local = LocalLimit(4.0, 1, 100)
    calls = {}
    while local.limit < 8:
        local.adjust(True, 0)
        calls.setdefault(math.floor(local.limit), local._since_cut)
    assert calls[5] == pytest.approx(4 * PROBE_CALLS, rel=0.15)
    at_one_per_probe = sum(PROBE_CALLS * limit for limit in (4, 5, 6, 7))
    assert calls[8] < 0.5 * at_one_per_probe


def test_auto_grows_the_same_in_redis_and_without_it():
    name = f"auto-{time.time_ns()}"
    store = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    store.hset(f"proxymq:flow:{{{name}}}:auto", mapping={"limit": 4, "probing": 1})
    leases = Leases(Shared("redis://127.0.0.1:6379/0", [name]), name, None, 5.0, auto=(1, 100))
    local = LocalLimit(4.0, 1, 100)
    out = [leases.acquire() for _ in range(3)]  # in use: the limit grows
    for _ in range(450):
        leases.release(leases.acquire(), ok=True)
        local.adjust(True, 3, used=local.limit <= (3 + 1) * 2)
    assert leases.limit == pytest.approx(local.limit, rel=1e-9)
    assert 8 <= leases.limit < 8.1  # and no further: 4 in use is half of 8
    for lease in out:
        leases.release(lease)


def test_a_limit_its_service_does_not_use_does_not_grow():
    """One call at a time for a long while under a limit of 8 says nothing of what the
    service can take: the limit must still be 8 when a burst comes, not the maximum."""
    name = f"auto-{time.time_ns()}"
    store = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    store.hset(f"proxymq:flow:{{{name}}}:auto", mapping={"limit": 8, "probing": 1})
    shared = Shared("redis://127.0.0.1:6379/0", [name])
    leases = Leases(shared, name, None, 5.0, auto=(1, 100))
    for _ in range(2000):
        leases.release(leases.acquire(), ok=True)
    assert leases.limit == 8
    shared._down_until = time.monotonic() + 60  # and while Redis is down
    for _ in range(2000):
        leases.release(leases.acquire(), ok=True)
    assert leases.limit == 8


REDIS = "redis://127.0.0.1:6379/0"


def _cap(limit: int) -> tuple[Leases, str, redis.Redis]:
    name = f"cap-{time.time_ns()}"
    leases = Leases(Shared(REDIS, [name]), name, limit, 5.0)
    return leases, f"proxymq:flow:{{{name}}}:leases", redis.Redis.from_url(REDIS)


def test_a_cap_far_from_binding_keeps_a_lease_for_the_workers_next_call():
    """No round trip per call while the cap has room: the lease stays in Redis (the cap
    counts it) and goes to the next call; the flow thread's tick gives it back. Only a
    tick finds the room."""
    leases, key, store = _cap(100)
    first = leases.acquire()
    leases.release(first)
    assert store.zcard(key) == 0  # no tick yet: nothing kept
    leases._give_back_idle()
    first = leases.acquire()
    leases.release(first)
    assert store.zcard(key) == 1
    assert leases.acquire() == first
    leases.release(first)
    leases._give_back_idle()
    assert store.zcard(key) == 0


def test_a_cap_near_binding_gives_each_lease_back_at_once():
    leases, key, store = _cap(8)
    other = Leases(Shared(REDIS, [leases._service]), leases._service, 8, 5.0)
    others = [other.acquire(), other.acquire()]
    leases._give_back_idle()  # 2 of 8: room
    mine = leases.acquire()  # 3 of 8: no more
    assert isinstance(mine, str) and store.zcard(key) == 3
    leases.release(mine)
    assert store.zcard(key) == 2
    assert leases.acquire() != mine
    for lease in others:
        other.release(lease)


def test_a_flush_while_the_cap_binds_never_lets_a_lost_lease_start_another_call():
    """Redis loses the leases while this worker holds most of the cap: a later take
    through Redis sees room, but only the tick may say so (it checks this worker's
    leases are still there), so the old leases go back, not to the next calls."""
    leases, key, store = _cap(8)
    leases._give_back_idle()
    old = [leases.acquire() for _ in range(6)]
    store.delete(key)
    assert isinstance(leases.acquire(), str)
    for lease in old:
        leases.release(lease)
    assert store.zcard(key) == 1
    assert leases.acquire() not in old


def test_a_lease_redis_lost_is_never_kept_for_another_call():
    """A flushed Redis: a call whose lease is gone ends; its lease must not start
    another call uncounted."""
    leases, key, store = _cap(100)
    leases._give_back_idle()
    lost = leases.acquire()
    store.delete(key)
    leases._give_back_idle()
    leases.release(lost)
    fresh = leases.acquire()
    assert fresh != lost and store.zcard(key) == 1
    leases.release(fresh)
    leases.close()
    assert store.zcard(key) == 0


def test_a_pause_set_by_another_worker_stops_kept_leases_within_a_tick():
    """The announcement of a pause may be lost; the pause key in Redis is not: the tick
    reads it and the next calls go through the script, which refuses them."""
    leases, key, store = _cap(100)
    leases._give_back_idle()
    busy = leases.acquire()
    store.set(key.replace(":leases", ":pause"), "1", px=5000)
    leases._give_back_idle()
    leases.release(busy)  # not kept for a call in the pause
    assert store.zcard(key) == 0
    assert isinstance(leases.acquire(), float)  # the pause's seconds left


def test_a_worker_shutting_down_gives_back_the_leases_it_kept_and_keeps_no_more():
    leases, key, store = _cap(100)
    leases._give_back_idle()
    late = leases.acquire()
    leases.release(leases.acquire())
    assert store.zcard(key) == 2
    leases.close()
    assert store.zcard(key) == 1
    leases._give_back_idle()  # the flow thread ticks on
    leases.release(late)  # a call that outlived the shutdown's settling
    assert store.zcard(key) == 0


def _rate(calls: int, burst: int | None = None) -> tuple[RateLimit, str, redis.Redis]:
    name = f"rate-{time.time_ns()}"
    rate = RateLimit(Shared(REDIS, [name]), name, Rate(calls, 1.0), burst)
    return rate, f"proxymq:flow:{{{name}}}:rate", redis.Redis.from_url(REDIS)


def test_a_rate_far_from_its_limit_takes_a_ticks_tokens_in_one_go_and_gives_back_the_rest():
    """100/s, a burst of 100: after a tick of 10 calls, the next take asks for 10 tokens
    (the bucket stays more than half full), the next 9 calls need no round trip, and
    the tick gives back what was not spent."""
    rate, key, store = _rate(100)
    assert [rate.take() for _ in range(10)] == [0.0] * 10
    rate._give_back_stock()
    first = float(store.get(key))
    assert rate.take() == 0.0
    taken = float(store.get(key))
    assert 99 <= taken - first <= 101  # 10 tokens of 10 ms
    assert [rate.take() for _ in range(4)] == [0.0] * 4
    assert float(store.get(key)) == taken  # spent from the stock
    rate._give_back_stock()
    assert 49 <= taken - float(store.get(key)) <= 51  # the 5 not spent


def test_a_rate_near_its_limit_takes_one_token_per_call():
    """A burst of 1: each token is the next call's, never a stock."""
    rate, _, _ = _rate(1000, burst=1)
    rate.take()
    rate._started = 10
    rate._give_back_stock()
    while rate.take() > 0:  # the next token, a millisecond on
        pass
    assert rate._stock == 0


def test_kept_leases_two_ticks_could_not_give_back_are_all_given_back_later():
    """close() and the flow thread's tick at once, Redis down: neither may overwrite the
    leases the other could not give back (they would hold their slots until expiry)."""
    leases, key, store = _cap(100)
    leases._give_back_idle()
    lease = leases.acquire()
    reach_redis, nested = leases._shared.run, []

    def down(command):
        if not nested:  # while the tick's script is in flight:
            nested.append(True)
            leases.release(lease)  # a call ends and keeps its lease
            leases._give_back_idle()  # close() gives it back, Redis down too
        return DOWN

    leases._shared.run = down
    leases._give_back_idle()
    leases._shared.run = reach_redis
    leases._give_back_idle()
    assert store.zcard(key) == 0


def test_calls_started_while_redis_was_down_that_fail_after_it_is_back_cut_once():
    """Slots taken while Redis was down carry no count of cuts (lease None). When Redis is
    back before they end, their failures are the one signal of one overshoot: they must
    not each cut the shared limit (ARGV[8] '' compared as math.huge cuts every time)."""
    name = f"auto-{time.time_ns()}"
    store = redis.Redis.from_url(REDIS)
    store.hset(f"proxymq:flow:{{{name}}}:auto", mapping={"limit": 40, "probing": 1})
    shared = Shared(REDIS, [name])
    leases = Leases(shared, name, None, 5.0, auto=(1, 100))
    leases.release(leases.acquire(), ok=None)  # learns the limit: 40
    assert leases.limit == 40
    shared._down_until = time.monotonic() + 60  # Redis down for these calls' start
    local = [leases.acquire() for _ in range(6)]
    assert local == [None] * 6
    shared._down_until = 0.0  # back before they end
    for slot in local:
        leases.release(slot, ok=False)
    # one overshoot, one cut (to half: none of them holds a lease in Redis); each of the
    # six cutting halves it six times, to the minimum
    assert leases.limit == 20


def test_a_redis_outage_after_a_long_local_climb_does_not_jump_the_local_limit():
    """The local limit's count of calls since its last cut outlives the outage it was
    counted in: after Redis cut the shared limit, the next outage's first success must
    not take the limit (and this worker's local share) to the maximum in one call."""
    name = f"auto-{time.time_ns()}"
    store = redis.Redis.from_url(REDIS)
    shared = Shared(REDIS, [name])
    leases = Leases(shared, name, None, 5.0, auto=(1, 100))
    shared._down_until = time.monotonic() + 600  # a long first outage without a failure
    leases._local._since_cut = 20000  # its count of calls (their climb is not the point)
    shared._down_until = 0.0  # Redis is back, where the fleet cut the limit to 4
    store.hset(f"proxymq:flow:{{{name}}}:auto", mapping={"limit": 4, "probing": 1})
    leases.release(leases.acquire(), ok=None)
    assert leases.limit == 4
    shared._down_until = time.monotonic() + 600  # the next outage
    leases.release(leases.acquire(), ok=True)
    assert leases.limit < 4 + 1


def test_after_redis_went_back_to_an_older_count_of_cuts_one_overshoot_still_cuts_once():
    """Redis restarted from an older snapshot (or failed over to a replica behind): the
    limit's ``cuts`` is lower than the count the calls in flight were taken under. Their
    failures, one overshoot, must cut once, not each (a lease ahead of the stored count
    compares >= for ever, since each cut adds only one)."""
    name = f"auto-{time.time_ns()}"
    store = redis.Redis.from_url(REDIS)
    auto = f"proxymq:flow:{{{name}}}:auto"
    store.hset(auto, mapping={"limit": 40, "probing": 1, "cuts": 10})
    leases = Leases(Shared(REDIS, [name]), name, None, 5.0, auto=(1, 100))
    held = [leases.acquire() for _ in range(30)]
    store.hset(auto, "cuts", 3)  # the older snapshot's count
    for lease in held[:6]:
        leases.release(lease, ok=False)
    assert leases.limit == 29  # one cut, to the 29 calls still out

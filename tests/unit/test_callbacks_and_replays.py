"""The pure parts of callbacks and dead-letter replays: the fair queue, the retry
delays, the copy a replay publishes, the settings."""

import threading
import time

import msgpack
import pytest

from proxymq.config import ConfigError, WorkerConfig
from proxymq.envelope import DELIVERIES_HEADER, RequestEnvelope, task_message
from workers import dead_letters
from workers.callback_queue import delays_ms
from workers.callbacks import (
    HOST_BACKLOG,
    SUBMITTER_BACKLOG,
    Callback,
    CallbackSender,
    FairQueue,
)

WORKER_ENV = {"PROXYMQ_SERVICE": "a", "PROXYMQ_DOWNSTREAM_URL": "http://a"}


def callback(host: str, n: int = 0, submitter: str = "") -> Callback:
    return Callback(f"http://{host}:8080/hook", f"c{n}", b"{}", 0, submitter)


def take_now(fair: FairQueue) -> Callback | None:
    """What ``take`` hands out within 0.2 s; None when it keeps waiting (the thread
    then takes the next one that may go, and is left to it)."""
    got: list[Callback] = []
    taker = threading.Thread(target=lambda: got.append(fair.take()), daemon=True)
    taker.start()
    taker.join(0.2)
    return got[0] if got else None


def test_the_fair_queue_serves_hosts_in_turn_and_at_most_per_host_at_once():
    fair = FairQueue(per_submitter=16, per_host=2)
    for n in range(5):
        fair.put(callback("slow.example", n))
    fair.put(callback("good.example", 9))
    taken = [fair.take(), fair.take(), fair.take()]
    assert [c.host for c in taken] == ["slow.example", "good.example", "slow.example"]
    assert fair.held(callback("slow.example")) == (5, 5)  # anonymous: by host
    got: list[Callback] = []
    waiting = threading.Thread(target=lambda: got.append(fair.take()), daemon=True)
    waiting.start()
    waiting.join(0.2)
    assert got == []  # slow.example has its 2 in flight, nobody else waits
    fair.done(taken[0])
    waiting.join(5)
    assert [c.correlation_id for c in got] == ["c2"]


def test_the_fair_queue_serves_submitters_in_turn_then_each_one_s_hosts_in_turn():
    fair = FairQueue(per_submitter=4, per_host=2)
    for n in range(6):  # one submitter, three hosts of its own, two callbacks each
        fair.put(callback(f"tarpit{n % 3}.example", n, "attacker"))
    fair.put(callback("good.example", 10, "good"))
    fair.put(callback("good.example", 11, "good"))
    taken = [fair.take() for _ in range(6)]
    assert [(c.submitter, c.host) for c in taken] == [
        ("attacker", "tarpit0.example"),
        ("good", "good.example"),
        ("attacker", "tarpit1.example"),
        ("good", "good.example"),
        ("attacker", "tarpit2.example"),
        ("attacker", "tarpit0.example"),
    ]


def test_a_submitter_has_at_most_per_submitter_in_flight_however_many_hosts_it_names():
    fair = FairQueue(per_submitter=4, per_host=2)
    for n in range(10):
        fair.put(callback(f"tarpit{n}.example", n, "attacker"))
    taken = [fair.take() for _ in range(4)]
    assert [c.host for c in taken] == [f"tarpit{n}.example" for n in range(4)]
    assert fair.held(callback("tarpit0.example", submitter="attacker")) == (10, 1)
    fair.put(callback("good.example", 20, "good"))
    assert take_now(fair).correlation_id == "c20"  # the attacker's 4 wait, not the good one
    waiting: list[Callback] = []
    taker = threading.Thread(target=lambda: waiting.append(fair.take()), daemon=True)
    taker.start()
    taker.join(0.2)
    assert not waiting  # the attacker has its 4 in flight, nobody else waits
    fair.done(taken[0])
    taker.join(5)
    assert [c.host for c in waiting] == ["tarpit4.example"]  # the attacker's next
    assert fair.held(callback("x", submitter="attacker")) == (9, 0)
    assert take_now(fair) is None


def test_a_host_has_at_most_per_host_in_flight_whoever_submitted_its_callbacks():
    fair = FairQueue(per_submitter=4, per_host=2)
    for submitter in ("alice", "bob", "carol"):
        fair.put(callback("slow.example", 0, submitter))
    fair.put(callback("other.example", 1, "carol"))
    taken = [fair.take() for _ in range(3)]
    assert [(c.submitter, c.host) for c in taken] == [
        ("alice", "slow.example"),
        ("bob", "slow.example"),
        ("carol", "other.example"),  # carol's slow.example waits: the host has its 2
    ]
    fair.done(taken[0])
    assert (fair.take().submitter, fair.held(taken[1])) == ("carol", (1, 1))


def test_anonymous_clients_count_by_host_and_all_together_at_most_per_anonymous():
    """No identity to tell anonymous clients apart: each host they name is a party of
    its own, and all of them together hold at most ``per_anonymous`` threads, so a
    client with a credential always finds one."""
    fair = FairQueue(per_submitter=4, per_host=2, per_anonymous=3)
    for n in range(6):
        fair.put(callback(f"host{n}.example", n))
    fair.put(callback("named.example", 9, "someone"))
    taken = [fair.take() for _ in range(4)]
    assert [c.correlation_id for c in taken] == ["c0", "c1", "c2", "c9"]
    assert take_now(fair) is None  # the anonymous have their 3 in flight


def test_counts_back_to_zero_are_forgotten():
    """Hosts are named by clients: what a worker counts them by must not pile up."""
    fair = FairQueue(per_submitter=4, per_host=2)
    for n in range(100):
        fair.put(callback(f"host{n}.example", n, f"submitter{n}"))
        fair.done(fair.take())
    assert fair.held(callback("host0.example", submitter="submitter0")) == (0, 0)
    counts = (fair._held, fair._active)
    assert [len(c.submitters) + len(c.hosts) for c in counts] == [0, 0]
    assert fair._waiting == {}


def test_a_worker_is_busy_with_a_submitter_or_a_host_past_its_backlog():
    sender = CallbackSender(None, False, threads=0)  # nothing taken: everything held
    for n in range(SUBMITTER_BACKLOG):
        assert not sender.busy_with(callback(f"host{n}.example", n, "attacker"))
        sender.submit(callback(f"host{n}.example", n, "attacker"), lambda *_: None)
    assert sender.busy_with(callback("fresh.example", submitter="attacker"))
    assert not sender.busy_with(callback("fresh.example", submitter="good"))
    for n in range(HOST_BACKLOG):
        sender.submit(callback("one.example", n, "good"), lambda *_: None)
    assert sender.busy_with(callback("one.example", submitter="good"))


def test_the_retry_delays_follow_the_schedule_then_repeat_the_last():
    env = {**WORKER_ENV, "PROXYMQ_CALLBACK_RETRIES": "7"}
    assert delays_ms(WorkerConfig.from_env(env)) == [
        5000, 30000, 120000, 600000, 3600000, 3600000, 3600000,
    ]  # fmt: skip
    scaled = {**WORKER_ENV, "PROXYMQ_CALLBACK_DELAY_SCALE": "0.1"}
    assert delays_ms(WorkerConfig.from_env(scaled)) == [500, 3000, 12000, 60000, 360000]
    assert WorkerConfig.from_env(WORKER_ENV).callback_retries == 5


@pytest.mark.parametrize("raw", ["-1", "21", "x", "1.5"])
def test_bad_callback_retries_is_one_line_naming_the_variable(raw):
    with pytest.raises(ConfigError, match=r"^PROXYMQ_CALLBACK_RETRIES: must be an integer"):
        WorkerConfig.from_env({**WORKER_ENV, "PROXYMQ_CALLBACK_RETRIES": raw})


def dead_letter(job: bool = False):
    request = RequestEnvelope(
        "svc", "POST", "/x", "a=1", [("h", "v")], b"body", int(time.time() * 1000) - 1000, job
    )
    body, headers, properties = task_message(request, "cid-1", "amq.gen-reply")
    headers["proxymq_sent"] -= 30_000  # sent 29 s before its deadline (the budget)
    headers |= {DELIVERIES_HEADER: 4, "x-delivery-count": 3, "x-proxymq-dead-reason": "r"}
    headers["x-proxymq-publish-id"] = "the dead letter's own"
    return body, headers, properties


def test_a_replay_is_a_fresh_first_delivery_with_a_fresh_deadline_and_no_reply_queue():
    body, headers, properties = dead_letter()
    copy = dead_letters.replay_of(body, headers, properties)
    assert DELIVERIES_HEADER not in copy.headers and "x-delivery-count" not in copy.headers
    assert "x-proxymq-dead-reason" not in copy.headers
    assert "x-proxymq-publish-id" not in copy.headers
    assert copy.headers["x-proxymq-replayed"] == 1
    assert "reply_to" not in copy.properties
    assert copy.properties["correlation_id"] == "cid-1"
    assert copy.properties["expiration"] == "29000"
    now = time.time() * 1000
    assert now + 28_000 < copy.request.deadline <= now + 29_000
    (wire,), _, _ = msgpack.unpackb(copy.body)
    assert (wire["deadline"], wire["body"]) == (copy.request.deadline, b"body")
    assert wire["query"] == "a=1"
    again = dead_letters.replay_of(copy.body, copy.headers, {**copy.properties})
    assert again.headers["x-proxymq-replayed"] == 2


def test_a_replay_as_a_job_is_persistent_under_a_correlation_id_of_its_own():
    body, headers, properties = dead_letter()
    copy = dead_letters.replay_of(body, headers, properties, job_timeout_ms=600_000)
    assert copy.request.job and copy.properties["delivery_mode"] == 2
    assert copy.properties["correlation_id"] != "cid-1"
    assert copy.headers["id"] == copy.properties["correlation_id"]
    assert copy.properties["expiration"] == "600000"


@pytest.mark.parametrize(
    ("body", "headers", "properties"),
    [
        (b"\xc1", {"task": "proxymq.forward"}, {"content_type": "application/x-msgpack",
                                                 "correlation_id": "c"}),
        (b"x", {"task": "other"}, {"content_type": "application/x-msgpack", "correlation_id": "c"}),
        (b"x", None, {}),
    ],
)  # fmt: skip
def test_what_is_no_request_is_not_replayed(body, headers, properties):
    with pytest.raises(dead_letters.NotARequest):
        dead_letters.replay_of(body, headers, properties)


def test_a_dead_letter_is_described_by_the_workers_marks():
    letter = dead_letters.describe(
        {"x-proxymq-dead-reason": "r", "x-proxymq-dead-deliveries": 4, "x-delivery-count": 9,
         "x-proxymq-dead-at": 1000},
        {"correlation_id": "c"},
    )  # fmt: skip
    assert (letter.correlation_id, letter.reason, letter.deliveries) == ("c", "r", 4)
    assert letter.age(3500) == 2.5


def test_another_client_s_callbacks_to_its_host_never_defer_the_victim_s():
    """An attacker naming the victim's receiving host (a filtered port: 3 s a connect)
    must not fill the host's backlog for everyone: the backlog is each party's."""
    sender = CallbackSender(None, False, threads=0)
    for n in range(HOST_BACKLOG):
        sender.submit(callback("hooks.victim.example", n, "attacker"), lambda *_: None)
        sender.submit(callback("hooks.victim.example", 10 + n), lambda *_: None)  # anonymous
    assert sender.busy_with(callback("hooks.victim.example", submitter="attacker"))
    assert not sender.busy_with(callback("hooks.victim.example", submitter="victim"))

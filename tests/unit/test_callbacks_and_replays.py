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
from workers.callbacks import Callback, FairQueue

WORKER_ENV = {"PROXYMQ_SERVICE": "a", "PROXYMQ_DOWNSTREAM_URL": "http://a"}


def callback(host: str, n: int = 0) -> Callback:
    return Callback(f"http://{host}:8080/hook", f"c{n}", b"{}", 0)


def test_the_fair_queue_serves_hosts_in_turn_and_at_most_per_host_at_once():
    fair = FairQueue(per_host=2)
    for n in range(5):
        fair.put(callback("slow.example", n))
    fair.put(callback("good.example", 9))
    taken = [fair.take(), fair.take(), fair.take()]
    assert [c.host for c in taken] == ["slow.example", "good.example", "slow.example"]
    assert fair.held("slow.example") == 5
    got: list[Callback] = []
    waiting = threading.Thread(target=lambda: got.append(fair.take()), daemon=True)
    waiting.start()
    waiting.join(0.2)
    assert got == []  # slow.example has its 2 in flight, nobody else waits
    fair.done(taken[0])
    waiting.join(5)
    assert [c.correlation_id for c in got] == ["c2"]


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
    return body, headers, properties


def test_a_replay_is_a_fresh_first_delivery_with_a_fresh_deadline_and_no_reply_queue():
    body, headers, properties = dead_letter()
    copy = dead_letters.replay_of(body, headers, properties)
    assert DELIVERIES_HEADER not in copy.headers and "x-delivery-count" not in copy.headers
    assert "x-proxymq-dead-reason" not in copy.headers
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

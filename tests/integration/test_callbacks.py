"""Job callbacks through the broker: retried on a schedule from RabbitMQ's own TTL queues,
delivered by any worker, kept when a worker dies, and never held up by other clients'
slow receivers."""

import functools
import json
import signal
import socket
import threading
import time
import uuid

import kombu
import pytest
import requests
from support import (
    BROKER_URL,
    RawServer,
    broker_user,
    poll_until_done,
    unique_service,
    wait_for,
)

from proxymq.envelope import ReplyEnvelope, RequestEnvelope, task_message
from proxymq.jobs import JobStore, new_job_id

RESULT_URL = "redis://127.0.0.1:6379/0"
ASYNC = {"Prefer": "respond-async"}
# Test-only: the retry delays (5 s, 30 s, 2 min, ...) times this, so a test waits
# 0.5 s, 3 s, ... instead of minutes.
FAST = {"PROXYMQ_CALLBACK_DELAY_SCALE": "0.1"}


@pytest.fixture(scope="module")
def gateway(stack):
    return stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)


def worker(stack, service, downstream, *extra, **env):
    env.setdefault("PROXYMQ_RESULT_URL", RESULT_URL)
    env.setdefault("PROXYMQ_CALLBACK_ALLOW_PRIVATE", "true")
    return stack.worker(service, downstream.url, *extra, **env)


def submit(gateway, service, callback, body=b"job", **headers):
    """``headers``: more of them, e.g. ``Authorization`` (whose job it is)."""
    response = requests.post(
        f"{gateway.url}/{service}/x",
        data=body,
        headers={**ASYNC, "X-ProxyMQ-Callback": callback, **headers},
    )
    assert response.status_code == 202, response.text
    return response


class Receiver(RawServer):
    """A callback receiver: answers ``statuses`` in turn (the last one from then on),
    or, as a ``tarpit``, sends a byte a second for ever. Records when each callback
    arrived and its body."""

    def __init__(self, statuses=(200,), tarpit: bool = False, host: str = "127.0.0.1") -> None:
        """``host``: a loopback address of its own is another receiving host."""
        self.statuses, self.tarpit, self.host = list(statuses), tarpit, host
        self.arrivals: list[tuple[float, bytes, int]] = []
        self._lock = threading.Lock()
        self._sock = socket.create_server((host, 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    def answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                while len(body) < length:
                    body += conn.recv(65536)
                if self.tarpit:
                    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 1000:
                        conn.sendall(bytes([byte]))
                        time.sleep(1)
                    return
                with self._lock:
                    status = self.statuses[min(len(self.arrivals), len(self.statuses) - 1)]
                    self.arrivals.append((time.monotonic(), body, status))
                conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
            except OSError:
                pass


def callback_state(gateway, location, **headers):
    answer = requests.get(gateway.url + location, headers=headers)
    return answer.headers.get("X-ProxyMQ-Callback-State")


GOOD_CLIENT = {"Authorization": "Bearer good"}
ATTACKER = {"Authorization": "Bearer attacker"}


def submit_to_tarpits(gateway, service, hosts: list[str], each: int = 1, **headers):
    """Jobs whose callbacks go to a tarpit on each of ``hosts``, ``each`` per host, once
    they are done: their callbacks are published before whatever is submitted next."""
    tarpits = [Receiver(tarpit=True, host=host) for host in hosts]
    locations = [
        submit(gateway, service, tarpit.url, **headers).headers["Location"]
        for tarpit in tarpits
        for _ in range(each)
    ]
    for location in locations:
        assert poll_until_done(gateway, location, **headers).status_code == 200


def good_callback_delay(gateway, service, what: str, client=GOOD_CLIENT) -> float:
    """Submit a job as ``client`` with a receiver that answers at once; the seconds from
    the job being done to its callback's arrival (once delivered)."""
    good = Receiver()
    location = submit(gateway, service, good.url, b"good", **client).headers["Location"]
    assert poll_until_done(gateway, location, **client).status_code == 200
    done = time.monotonic()
    wait_for(lambda: good.arrivals, 40, "the good callback")
    delay = good.arrivals[0][0] - done
    print(f"\n[callbacks] {what}: the good callback came {delay:.2f} s after its job was done")
    state = functools.partial(callback_state, gateway, location, **client)
    wait_for(lambda: state() == "delivered", 10, "delivered")
    return delay


def test_tarpit_receivers_do_not_delay_another_submitter_s_callback(stack, gateway, downstream):
    """Everyone anonymous, as the issue tried it: four slow hosts hold 8 threads."""
    service = unique_service("tarpit")
    worker(stack, service, downstream)
    submit_to_tarpits(gateway, service, [f"127.0.0.{n}" for n in range(2, 6)])
    delay = good_callback_delay(gateway, service, "behind 4 anonymous tarpits", client={})
    assert delay < 2, f"the good callback came {delay:.1f} s after its job was done"


def test_anonymous_tarpits_on_many_hosts_do_not_delay_a_client_with_a_credential(
    stack, gateway, downstream
):
    """Twelve anonymous tarpit hosts, two callbacks each: by host alone they would hold
    all 16 threads; all anonymous clients together hold at most 10."""
    service = unique_service("anontarpits")
    worker(stack, service, downstream)
    submit_to_tarpits(gateway, service, [f"127.0.2.{n}" for n in range(1, 13)], each=2)
    delay = good_callback_delay(gateway, service, "behind 12 anonymous tarpit hosts")
    assert delay < 2, f"the good callback came {delay:.1f} s after its job was done"


def test_one_submitter_s_tarpits_on_many_hosts_do_not_delay_another_submitter_s_callback(
    stack, gateway, downstream
):
    """Ten tarpit hosts, two callbacks each: 20 attempts would hold all 16 sender threads
    for 10 s each if only hosts were taken in turn; submitters are taken in turn first."""
    service = unique_service("tarpits")
    worker(stack, service, downstream)
    hosts = [f"127.0.0.{n}" for n in range(2, 12)]
    submit_to_tarpits(gateway, service, hosts, each=2, **ATTACKER)
    delay = good_callback_delay(gateway, service, "behind 10 tarpit hosts, 2 callbacks each")
    assert delay < 2, f"the good callback came {delay:.1f} s after its job was done"


def test_one_submitter_s_callbacks_to_many_hosts_do_not_fill_the_worker_s_prefetch(
    stack, gateway, downstream
):
    """72 tarpit hosts, one callback each (names of a wildcard DNS zone would do): held
    by hosts alone, they would be the 64 callbacks a worker prefetches, and the good
    one would wait in the broker for the first of them to be done."""
    service = unique_service("tarpitfill")
    worker(stack, service, downstream)
    hosts = [f"127.0.1.{n}" for n in range(1, 73)]
    submit_to_tarpits(gateway, service, hosts, **ATTACKER)
    delay = good_callback_delay(gateway, service, "behind 72 tarpit hosts")
    assert delay < 2, f"the good callback came {delay:.1f} s after its job was done"


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_callback_failing_twice_arrives_though_the_worker_that_ran_the_job_is_killed(
    stack, gateway, downstream, queue_type
):
    service = unique_service("cbkill")
    first = worker(stack, service, downstream, PROXYMQ_QUEUE_TYPE=queue_type, **FAST)
    receiver = Receiver(statuses=(500, 500, 200))
    location = submit(gateway, service, receiver.url, b"survives").headers["Location"]
    assert poll_until_done(gateway, location).status_code == 200
    wait_for(lambda: receiver.arrivals, 20, "the first attempt")
    first.signal(signal.SIGKILL)
    first.popen.wait(10)
    worker(stack, service, downstream, PROXYMQ_QUEUE_TYPE=queue_type, **FAST)
    wait_for(lambda: len(receiver.arrivals) >= 3, 60, "the third attempt")
    bodies = [json.loads(body)["body"] for _, body, _ in receiver.arrivals]
    assert bodies[:3] == ["survives"] * 3
    wait_for(lambda: callback_state(gateway, location) == "delivered", 10, "delivered")
    time.sleep(1)
    assert len(receiver.arrivals) == 3  # delivered: never sent again


def test_retries_follow_the_schedule_then_the_job_says_failed(stack, gateway, downstream):
    service = unique_service("cbfail")
    worker(stack, service, downstream, PROXYMQ_CALLBACK_RETRIES="2", **FAST)
    receiver = Receiver(statuses=(503,))
    location = submit(gateway, service, receiver.url).headers["Location"]
    assert poll_until_done(gateway, location).status_code == 200
    wait_for(lambda: callback_state(gateway, location) == "retrying", 20, "retrying")
    wait_for(lambda: callback_state(gateway, location) == "failed", 30, "failed")
    times = [arrived for arrived, _, _ in receiver.arrivals]
    assert len(times) == 3  # the first attempt and PROXYMQ_CALLBACK_RETRIES=2 retries
    # About 5 s and 30 s, times 0.1: 0.5 s and 3 s (a TTL queue is never early).
    assert 0.45 < times[1] - times[0] < 2.5
    assert 2.9 < times[2] - times[1] < 5.5


def test_a_finished_job_delivered_again_before_its_callback_was_published_gets_it(
    stack, downstream
):
    """A worker that stored a job's answer and died before the broker held its callback
    leaves the request to be delivered again: the job is not run again, but its
    callback is sent."""
    service = unique_service("cbredo")
    worker(stack, service, downstream)
    receiver = Receiver()
    correlation_id = str(uuid.uuid4())
    store = JobStore(RESULT_URL, 60)
    deadline = int(time.time() * 1000) + 60_000
    store.create(new_job_id(), correlation_id, service, "", deadline)
    store.start(correlation_id)
    store.finish(correlation_id, ReplyEnvelope(status=200, body=b"stored"))
    request = RequestEnvelope(
        service, "POST", "/x", None, [], b"again", deadline, job=True, callback=receiver.url
    )
    body, headers, properties = task_message(request, correlation_id, None)
    with kombu.Connection(BROKER_URL) as connection:
        connection.Producer().publish(
            body,
            routing_key=f"{service}_requests",
            headers=headers,
            serializer=None,
            content_type=properties["content_type"],
            content_encoding=properties["content_encoding"],
            correlation_id=correlation_id,
        )
    wait_for(lambda: receiver.arrivals, 20, "the callback")
    assert json.loads(receiver.arrivals[0][1])["body"] == "stored"
    assert downstream.requests_for(correlation_id) == []  # not run again


def test_a_callback_message_another_broker_user_published_is_dropped_unsent(
    stack, gateway, downstream
):
    """Callbacks are signed: whoever else may publish to the queue (the gateway's user
    can publish anywhere) must not get a forged answer signed and sent."""
    service = unique_service("cbforge")
    victim = worker(stack, service, downstream, PROXYMQ_CALLBACK_SECRET="s3cret")
    receiver = Receiver()
    headers = {"x-proxymq-callback-url": receiver.url, "x-proxymq-callback-attempts": 0}
    with broker_user() as (_, url), kombu.Connection(url) as connection:
        connection.Producer().publish(
            b'{"status": 200, "body": "forged"}',
            routing_key=f"{service}_callbacks",
            headers=headers,
            serializer=None,
            content_type="application/json",
            correlation_id="forged",
        )
    wait_for(lambda: "dropped a callback" in victim.log(), 10, "the forged callback dropped")
    # A real one still goes out (the forged one was first in the queue).
    location = submit(gateway, service, receiver.url, b"real").headers["Location"]
    assert poll_until_done(gateway, location).status_code == 200
    wait_for(lambda: receiver.arrivals, 20, "the real callback")
    assert [json.loads(body)["body"] for _, body, _ in receiver.arrivals] == ["real"]


def test_a_dead_lettered_job_s_callback_says_poison(stack, gateway, downstream):
    service = unique_service("cbpoison")
    worker(stack, service, downstream)
    receiver = Receiver()
    correlation_id = str(uuid.uuid4())
    deadline = int(time.time() * 1000) + 60_000
    job_id = new_job_id()
    JobStore(RESULT_URL, 60).create(job_id, correlation_id, service, "", deadline)
    request = RequestEnvelope(
        service, "POST", "/x", None, [], b"poison", deadline, job=True, callback=receiver.url
    )
    body, headers, properties = task_message(request, correlation_id, None)
    with kombu.Connection(BROKER_URL, transport_options={"confirm_publish": True}) as connection:
        connection.Producer().publish(
            body,
            routing_key=f"{service}_requests",
            headers={**headers, "proxymq_deliveries": 4},  # past PROXYMQ_MAX_DELIVERIES
            serializer=None,
            content_type=properties["content_type"],
            content_encoding=properties["content_encoding"],
            correlation_id=correlation_id,
        )
    answer = poll_until_done(gateway, f"/jobs/{job_id}")
    assert (answer.status_code, answer.headers["X-ProxyMQ-Error"]) == (502, "poison")
    wait_for(lambda: receiver.arrivals, 20, "the callback")
    posted = json.loads(receiver.arrivals[0][1])
    assert (posted["status"], posted["error"]) == (502, "poison")
    assert downstream.requests_for(correlation_id) == []

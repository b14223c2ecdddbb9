"""A RabbitMQ cluster loses a node under load; nothing is lost (issue: cluster).

Three nodes of the test's own (``stack.PrivateCluster``), a quorum request queue, two
gateways and two workers, each given the three nodes as a ``;`` list in its own order so
that their connections spread over the nodes. 32 client threads keep a steady load while
one node is killed with SIGKILL: the request queue's leader, the node a gateway is
connected to, then each node in turn (a rolling restart). Every request must end in its
answer or a named 503 within its deadline (never ``queue-full``: the queue has no length
limit), every downstream call must belong to a request that was answered, and throughput
must be back within 10 s. The counts are printed
(run with ``-s``, as the ``cluster`` tox env does) for docs/scaling.md.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import kombu
import psutil
import pytest
import requests
from support import Scrape, Stack, unique_service, wait_for

CLIENTS = 32
TIMEOUT = 10  # X-ProxyMQ-Timeout, seconds
MARGIN = 5  # the client's own timeout is TIMEOUT + MARGIN
WARM_UP = 5.0  # seconds of load before the kill; the last 4 are the baseline
AFTER = 12.0  # seconds of load after the kill (after the last restart when rolling)
RECOVERY = 10.0  # throughput back to FLOOR of the baseline within this, for good
# With every part working, the stack settled at 70 to 80 % of the baseline after a kill
# on a saturated machine, and at 60 % (1 s windows down to 48 %) in a run whose 4 s
# baseline fell in a lull of others' jobs (docs/scaling.md): the old 80 %, then half,
# failed healthy runs. A stalled stack makes 0; a stuck part is caught by
# ``expect_components_back``, which throughput cannot tell.
FLOOR = 1 / 3
NAMED_503 = frozenset({"broker-unavailable", "queue-full"})
SETTLED = 5.0  # seconds after the last kill (or all back) from which every request is a 200


@dataclass
class Outcome:
    key: str
    gateway: int
    started: float
    ended: float = 0.0
    status: int | None = None  # None: no HTTP answer at all
    error: str | None = None  # X-ProxyMQ-Error
    problem: str | None = None  # why it is lost, if it is


@dataclass
class Load:
    """CLIENTS threads, each posting one request at a time to the gateways in turn."""

    gateways: list
    service: str
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Load:
        self.threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)
        ]
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        # Windows end here: after it no client starts a request, and a window across
        # it would count only the tail of the ones in flight.
        self.stopped_at = time.monotonic()
        self.stopping.set()
        for thread in self.threads:
            thread.join(TIMEOUT + MARGIN + 5)

    def _client(self, number: int) -> None:
        session = requests.Session()
        turn = number
        while not self.stopping.is_set():
            turn += 1
            index = turn % len(self.gateways)
            key = uuid.uuid4().hex
            outcome = Outcome(key, index, time.monotonic())
            body = key.encode()
            try:
                response = session.post(
                    f"{self.gateways[index].url}/{self.service}/sleep/0.02/{key}",
                    data=body,
                    headers={"X-ProxyMQ-Timeout": str(TIMEOUT)},
                    timeout=TIMEOUT + MARGIN,
                )
                outcome.status = response.status_code
                outcome.error = response.headers.get("X-ProxyMQ-Error")
                if response.status_code == 200 and response.content != body:
                    outcome.problem = f"200 with the wrong body {response.content[:80]!r}"
            except requests.RequestException as exc:
                outcome.problem = f"no answer: {exc!r}"
                session = requests.Session()
            outcome.ended = time.monotonic()
            if outcome.ended - outcome.started > TIMEOUT + MARGIN and not outcome.problem:
                outcome.problem = "answered after its deadline"
            self.outcomes.append(outcome)
            if outcome.status == 503:
                time.sleep(0.05)  # as a client honouring Retry-After would, only shorter

    def rate(self, start: float, end: float) -> float:
        """200 answers per second completed in [start, end)."""
        done = sum(1 for o in self.outcomes if o.status == 200 and start <= o.ended < end)
        return done / (end - start)


@pytest.fixture(scope="module")
def service():
    return unique_service("cluster")


@pytest.fixture(scope="module")
def system(cluster, downstream, service):
    """Two workers and two gateways on the cluster, each with the nodes in its own order."""
    stack = Stack()
    try:
        env = {"PROXYMQ_QUEUE_TYPE": "quorum"}
        workers = [
            stack.worker(
                service,
                downstream.url,
                "--loglevel=INFO",
                wait=False,
                PROXYMQ_BROKER_URL=cluster.urls(first),
                **env,
            )
            for first in (2, 0)
        ]
        queue = f"{service}_requests"
        wait_for(lambda: consumer_count(cluster, queue) == 2, 60, "two workers consuming")
        gateways = [
            stack.gateway("--log-level=info", PROXYMQ_BROKER_URL=cluster.urls(first))
            for first in (0, 1)
        ]
        pids = _pids(workers, gateways)
        yield workers, gateways
        assert _pids(workers, gateways) == pids, "a product process died or was restarted"
    finally:
        stack.stop()


def _pids(workers, gateways) -> list:
    """The PIDs of every product process: gunicorn's master and its workers, the Celery
    workers. A process that died, or that gunicorn replaced, changes this."""
    for process in (*workers, *(g.process for g in gateways)):
        assert process.alive(), f"{process.args} died:\n{process.log()[-3000:]}"
    return [
        (process.pid, sorted(c.pid for c in psutil.Process(process.pid).children()))
        for process in (*workers, *(g.process for g in gateways))
    ]


def consumer_count(cluster, queue: str) -> int:
    with kombu.Connection(cluster.url, connect_timeout=2) as connection:
        _, _, count = connection.default_channel.queue_declare(queue, passive=True)
        return count


def live_node(cluster):
    return next(node for node in cluster.nodes if node.running())


def leader_of(cluster, queue: str):
    rows = json.loads(
        live_node(cluster).ctl("list_queues", "name", "leader", "--formatter", "json")
    )
    leader = next(row["leader"] for row in rows if row["name"] == queue)
    return cluster.node_named(leader)


def gateway_node(cluster, gateway):
    """The node a one-process gateway is connected to now: the remote port of its
    gunicorn worker's AMQP socket."""
    ports = {node.port for node in cluster.nodes}
    (worker,) = psutil.Process(gateway.process.pid).children()
    (port,) = {
        c.raddr.port
        for c in worker.net_connections("tcp")
        if c.raddr and c.raddr.port in ports and c.status == psutil.CONN_ESTABLISHED
    }
    return cluster.node_on_port(port)


def members_online(cluster, queue: str) -> int:
    rows = json.loads(
        live_node(cluster).ctl("list_queues", "name", "online", "--formatter", "json")
    )
    return len(next(row["online"] for row in rows if row["name"] == queue))


def report(
    name: str, load: Load, downstream, killed_at: list[float], back_at: float | None = None
) -> dict:
    """Print and return the counts; assert nothing was lost."""
    outcomes = list(load.outcomes)
    by_key = {o.key: o for o in outcomes}
    calls = Counter(s.raw_uri.rsplit("/", 1)[-1] for s in downstream.seen)
    calls = Counter({key: n for key, n in calls.items() if key in by_key})
    statuses = Counter(o.status for o in outcomes)
    errors = Counter(o.error for o in outcomes if o.status == 503)
    lost = [
        o
        for o in outcomes
        if o.problem or not (o.status == 200 or (o.status == 503 and o.error in NAMED_503))
    ]
    answered_not_called = [o for o in outcomes if o.status == 200 and o.key not in calls]
    called_then_503 = Counter(by_key[key].error for key in calls if by_key[key].status == 503)
    first = killed_at[0]
    baseline = load.rate(first - 4, first)
    windows = []  # (offset from the first kill, 200/s)
    t = first
    while t + 1 <= load.stopped_at:
        windows.append((t - first, load.rate(t, t + 1)))
        t += 0.5
    recovered = _stays_above(windows, 0.0, FLOOR * baseline)
    # After the last kill, or (rolling restart) once every node is back: a node booting
    # on this 2-CPU machine takes CPU from the load that no product could give back.
    last = killed_at[-1] if back_at is None else back_at
    recovered_last = _stays_above(windows, last - first, FLOOR * baseline)
    if recovered_last is not None:
        recovered_last -= last - first
    dip = min((rate for offset, rate in windows if offset <= RECOVERY), default=0.0)
    settled_rate = load.rate(load.calm_at + SETTLED, load.stopped_at)
    settled = [o for o in outcomes if o.started >= load.calm_at + SETTLED]
    settled_not_200 = [o for o in settled if o.status != 200]
    gateway_200s = [
        sum(1 for o in settled if o.gateway == index and o.status == 200)
        for index in range(len(load.gateways))
    ]
    calls_then, calls_at_end = load.worker_calls
    worker_calls = [end - then for then, end in zip(calls_then, calls_at_end, strict=True)]
    per_gateway_gap = {}
    for index in range(len(load.gateways)):
        after = [
            o.ended - first
            for o in outcomes
            if o.gateway == index and o.status == 200 and o.started >= first
        ]
        per_gateway_gap[index] = round(min(after), 2) if after else None
    # When the 503s came, by error: seconds after the first kill -> how many.
    when = {
        code: dict(
            sorted(Counter(round(o.ended - first) for o in outcomes if o.error == code).items())
        )
        for code in errors
    }
    counts = {
        "requests": len(outcomes),
        "answered_200": statuses[200],
        "named_503": dict(errors),
        "timeout_504": statuses[504],
        "lost": len(lost),
        "downstream_calls": sum(calls.values()),
        "downstream_calls_seen_twice": sum(1 for n in calls.values() if n > 1),
        "downstream_called_client_got_503": dict(called_then_503),
        "answered_200_without_a_call": len(answered_not_called),
        "baseline_per_s": round(baseline, 1),
        "lowest_1s_window_per_s": round(dip, 1),
        "pct_of_baseline_from_5s_after_calm": round(100 * settled_rate / baseline),
        "back_to_floor_after_s": recovered,
        "back_to_floor_after_last_kill_s"
        if back_at is None
        else "back_to_floor_after_all_back_s": (recovered_last),
        "first_200_after_kill_per_gateway_s": per_gateway_gap,
        "503_by_second_after_kill": when,
        "kills_at_s": [round(t - first, 1) for t in killed_at],
        "200_per_s_by_second_after_kill": [
            round(rate) for offset, rate in windows if offset == int(offset)
        ],
        "not_200_started_5s_after_calm": len(settled_not_200),
        "200_per_gateway_from_5s_after_calm": gateway_200s,
        "worker_calls_from_5s_after_calm": worker_calls,
    }
    print(f"\n[cluster] {name}: {json.dumps(counts)}")
    for o in lost[:10]:
        print(f"[cluster] {name}: lost {o}")
    assert not lost, f"{len(lost)} requests lost, e.g. {lost[:3]}"
    assert statuses[504] == 0
    assert not answered_not_called
    # The queue has no length limit: a nack is a failover's, retried (gateway/refusals.py).
    assert errors["queue-full"] == 0, f"{errors['queue-full']} answered queue-full"
    expect_components_back(settled_not_200, gateway_200s, worker_calls)
    return counts


def expect_components_back(
    settled_not_200: list[Outcome], gateway_200s: list[int], worker_calls: list[int]
) -> None:
    """Every part of the stack works again, whatever the CPU left to it: of the requests
    started SETTLED s after the last kill (or after every node is back), none is
    answered other than 200 (a publishing channel nacked for good answers 503), each
    gateway answers at least a quarter of the 200s (the clients take turns; a gateway
    stuck publishing holds every client that turns to it, and none is answered), and
    each worker makes at least a quarter of the downstream calls (a consumer cancelled
    by the quorum queue and never subscribed again makes none; the queue spreads the
    requests evenly over its consumers)."""
    assert not settled_not_200, f"{len(settled_not_200)} not 200, e.g. {settled_not_200[:3]}"
    _each_takes_a_quarter(gateway_200s, "gateway answered", "200s")
    _each_takes_a_quarter(worker_calls, "worker made", "downstream calls")


def _each_takes_a_quarter(shares: list[int], who: str, what: str) -> None:
    assert sum(shares) and all(share >= sum(shares) / 4 for share in shares), (
        f"a {who} less than a quarter of the {what}: {shares}"
    )


def _stays_above(windows: list[tuple[float, float]], since: float, floor: float) -> float | None:
    """The first offset from ``since`` on after which every 1 s window's rate stays at or
    above ``floor`` until the load ends: recovered for good, not a moment of a good
    second before the dip (None when it never does)."""
    later = [(offset, rate) for offset, rate in windows if offset >= since]
    for index, (offset, _) in enumerate(later):
        if all(rate >= floor for _, rate in later[index:]):
            return offset
    return None


def run_load(system, service, action) -> tuple[Load, list[float]]:
    """Load for WARM_UP s, then ``action()`` (returns the kill times), then AFTER s."""
    workers, gateways = system
    load = Load(gateways, service).start()
    try:
        time.sleep(WARM_UP)
        killed_at = action()
        load.calm_at = time.monotonic()  # the last kill, or every node back
        time.sleep(SETTLED)
        before = worker_calls(workers)
        time.sleep(AFTER - SETTLED)
    finally:
        load.stop()
    load.worker_calls = (before, worker_calls(workers))
    return load, killed_at


def worker_calls(workers) -> list[int]:
    """Each worker's downstream calls so far, from its own metrics."""
    return [
        int(
            Scrape(f"http://127.0.0.1:{w.env['PROXYMQ_WORKER_METRICS_PORT']}/metrics").value(
                "proxymq_worker_downstream_requests_total"
            )
        )
        for w in workers
    ]


def settle(cluster, downstream, service) -> None:
    """Every node back, and the queue drained: what remains in flight gets answered or
    redelivered before the counts are taken."""
    for node in cluster.nodes:
        if not node.running():
            cluster.restart(node)
    queue = f"{service}_requests"

    def drained() -> bool:
        with kombu.Connection(cluster.url, connect_timeout=2) as connection:
            _, count, _ = connection.default_channel.queue_declare(queue, passive=True)
            return count == 0

    wait_for(drained, 30, "the request queue to drain")
    time.sleep(1)  # calls still running in the downstream are recorded by now


def test_kill_the_request_queues_leader(cluster, system, downstream, service):
    queue = f"{service}_requests"
    killed = []

    def kill_leader():
        node = leader_of(cluster, queue)
        killed.append(node.name)
        at = time.monotonic()
        node.kill()
        return [at]

    load, killed_at = run_load(system, service, kill_leader)
    new_leader = leader_of(cluster, queue)
    settle(cluster, downstream, service)
    counts = report(f"kill -9 the queue leader {killed[0]}", load, downstream, killed_at)
    assert new_leader.name != killed[0]
    expect_recovery(counts["back_to_floor_after_s"])


def expect_recovery(recovered: float | None) -> None:
    """Throughput back to FLOOR of the baseline within RECOVERY seconds, for good. It once
    was not, now and then: a gateway that reconnected from the dead node first published
    before the new leader was recorded, and RabbitMQ 3.10 nacked that channel's every
    publish until the end of the run (test_quorum_publish.py pins the cure). The floor is
    a third, not 80 % (FLOOR): on this shared machine a working cluster settled at 60 to
    80 % of a baseline taken a minute earlier."""
    assert recovered is not None and recovered <= RECOVERY, (
        f"throughput not back to {FLOOR:.0%} within {RECOVERY} s ({recovered})"
    )


def test_kill_the_node_a_gateway_is_connected_to(cluster, system, downstream, service):
    _, gateways = system
    killed = []

    def kill_gateways_node():
        node = gateway_node(cluster, gateways[0])
        killed.append(node)
        at = time.monotonic()
        node.kill()
        return [at]

    load, killed_at = run_load(system, service, kill_gateways_node)
    moved_to = gateway_node(cluster, gateways[0])
    settle(cluster, downstream, service)
    counts = report(f"kill -9 gateway 0's node {killed[0].name}", load, downstream, killed_at)
    assert moved_to is not killed[0]
    expect_recovery(counts["back_to_floor_after_s"])


def test_rolling_restart_kills_each_node_in_turn(cluster, system, downstream, service):
    queue = f"{service}_requests"

    back = []

    def roll():
        times = []
        for node in cluster.nodes:
            times.append(time.monotonic())
            node.kill()
            cluster.restart(node)
            wait_for(lambda: members_online(cluster, queue) == 3, 30, "3 queue members", 0.5)
        back.append(time.monotonic())
        return times

    load, killed_at = run_load(system, service, roll)
    settle(cluster, downstream, service)
    name = "rolling restart, kill -9 each node in turn"
    counts = report(name, load, downstream, killed_at, back[0])
    expect_recovery(counts["back_to_floor_after_all_back_s"])

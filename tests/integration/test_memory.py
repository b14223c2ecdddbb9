"""10,000 requests, half of them timing out, leave gateway and worker memory flat."""

import concurrent.futures
import threading

import psutil
import requests
from support import unique_service

local = threading.local()


def rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    tree = [process, *process.children(recursive=True)]
    return sum(p.memory_info().rss for p in tree) / 2**20


def call(url: str, i: int) -> int:
    if not hasattr(local, "session"):
        local.session = requests.Session()
    if i % 2:  # times out at the gateway; the worker's late reply must be dropped
        headers = {"X-ProxyMQ-Timeout": "0.02"}
        return local.session.post(f"{url}/sleep/0.05", data=b"slow", headers=headers).status_code
    return local.session.post(f"{url}/echo", data=b"x" * 1000).status_code


def run(url: str, count: int) -> list[int]:
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        return list(pool.map(lambda i: call(url, i), range(count)))


def test_memory_stays_flat_over_10000_requests_with_timeouts(stack, downstream):
    service = unique_service("memory")
    worker = stack.worker(service, downstream.url)
    gateway = stack.gateway()
    url = f"{gateway.url}/{service}"
    warm = run(url, 2000)
    before = rss_mb(gateway.process.pid), rss_mb(worker.pid)
    statuses = run(url, 8000)
    after = rss_mb(gateway.process.pid), rss_mb(worker.pid)
    print(f"RSS MB gateway {before[0]:.1f} -> {after[0]:.1f}", end=", ")
    print(f"worker {before[1]:.1f} -> {after[1]:.1f}")
    assert statuses.count(200) + warm.count(200) == 5000
    assert statuses.count(504) >= 3000  # most slow ones time out (some may 502 at the worker)
    assert after[0] - before[0] < 8, "gateway memory grew"
    assert after[1] - before[1] < 8, "worker memory grew"

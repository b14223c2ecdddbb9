"""Metrics with SPEC.md's names, from the gateway (all processes) and the worker."""

import re

import requests
from support import free_port, unique_service, wait_for


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in text.splitlines():
        match = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if match and wanted <= set((match.group(1) or "").split(",")):
            return float(match.group(2))
    return 0.0


def test_gateway_and_worker_count_every_request_across_processes(stack, downstream):
    service = unique_service("metrics")
    port = free_port()
    stack.worker(service, downstream.url, PROXYMQ_WORKER_METRICS_PORT=str(port))
    gateway = stack.gateway(workers=2)
    for i in range(20):
        assert requests.post(f"{gateway.url}/{service}/m", data=str(i)).status_code == 200
    assert requests.get(f"{gateway.url}/{service}/status/503").status_code == 503
    timed_out = requests.get(f"{gateway.url}/{service}/sleep/3", headers={"X-ProxyMQ-Timeout": "1"})
    assert timed_out.status_code == 504
    assert requests.get(f"{gateway.url}/{unique_service()}/x").status_code == 404

    for _ in range(4):  # several scrapes: different gunicorn workers answer, same totals
        text = requests.get(gateway.url + "/metrics").text
        total = "proxymq_gateway_requests_total"
        assert sample(text, total, service=service, status="200") == 20
        assert sample(text, total, service=service, status="503") == 1
        assert sample(text, total, service=service, status="504") == 1
        assert sample(text, total, service="_unknown", status="404") == 1
        assert sample(text, "proxymq_gateway_request_duration_seconds_count", service=service) == 22
        assert sample(text, "proxymq_gateway_timeouts_total", service=service) == 1
        assert sample(text, "proxymq_gateway_inflight", service=service) == 0

    def worker_text() -> str:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text

    # The worker gives up on the slow call at the request's deadline: a 504, as the
    # gateway's own (never a 502 for a deadline).
    downstream_total = "proxymq_worker_downstream_requests_total"
    wait_for(
        lambda: sample(worker_text(), downstream_total, service=service, status="504") == 1,
        10,
        "the slow call to end at its deadline",
    )
    text = worker_text()
    assert sample(text, downstream_total, service=service, status="200") == 20
    assert sample(text, downstream_total, service=service, status="503") == 1
    assert sample(text, "proxymq_worker_downstream_duration_seconds_count", service=service) == 22
    assert sample(text, "proxymq_worker_queue_wait_seconds_count", service=service) == 22

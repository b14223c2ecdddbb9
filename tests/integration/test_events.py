"""Task events (what Flower and celery-exporter read) leave the worker in bunches: one
``task.multi`` message carries the events of many requests, and none is lost."""

from __future__ import annotations

import kombu
import requests
from support import BROKER_URL, TaskEventsTap, unique_service, wait_for


def test_events_of_back_to_back_requests_share_messages_and_none_is_lost(stack, downstream):
    service = unique_service("events")
    with kombu.Connection(BROKER_URL) as connection:
        tap = TaskEventsTap(connection)
        stack.worker(service, downstream.url)
        gateway = stack.gateway()

        def send(i: int) -> str:
            response = requests.post(f"{gateway.url}/{service}/echo", data=b"%d" % i, timeout=30)
            assert response.status_code == 200
            return response.headers["X-Correlation-ID"]

        ids = {send(i) for i in range(64)}

        seen: dict[str, set[str]] = {"task-received": set(), "task-succeeded": set()}
        sizes: list[int] = []  # events of ours in each message that had any

        def all_seen() -> bool:
            for bunch in tap.bunches():
                # Only this test's requests count: other workers may share the exchange.
                ours = [event for event in bunch if event["uuid"] in ids]
                if ours:
                    sizes.append(len(ours))
                for event in ours:
                    seen.get(event["type"], set()).add(event["uuid"])
            return all(ids <= got for got in seen.values())

        wait_for(all_seen, 10, "the task events of every request")

    assert ids <= seen["task-received"]
    assert ids <= seen["task-succeeded"]
    # One request at a time: Celery alone sends a message per event loop turn, two or
    # more per request (~130 here); bunched, a message carries many requests' events.
    messages, events = len(sizes), sum(sizes)
    assert messages * 4 <= events, f"{events} events in {messages} messages"

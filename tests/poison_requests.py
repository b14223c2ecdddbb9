"""Requests a worker dead-letters: for the dead-letter tests (integration and cluster)."""

from __future__ import annotations

import time
import uuid

import kombu
from support import BROKER_URL

from proxymq.envelope import DELIVERIES_HEADER, RequestEnvelope, task_message


def publish_poison(service: str, count: int, path: str = "/x", url: str = BROKER_URL) -> list[str]:
    """``count`` well-formed requests counted as a 4th delivery: the worker refuses
    it and dead-letters each. Their correlation ids."""
    ids = []
    # Confirmed: a quorum queue declared a moment ago may drop an unconfirmed publish.
    with kombu.Connection(url, transport_options={"confirm_publish": True}) as connection:
        producer = connection.Producer()
        for number in range(count):
            correlation_id = str(uuid.uuid4())
            request = RequestEnvelope(
                service=service,
                method="POST",
                path=f"{path}/{number}",
                query=None,
                headers=[("content-type", "text/plain")],
                body=f"body-{number}".encode(),
                deadline=int(time.time() * 1000) + 60_000,
            )
            body, headers, properties = task_message(request, correlation_id, None)
            producer.publish(
                body,
                routing_key=f"{service}_requests",
                headers={**headers, DELIVERIES_HEADER: 4},
                serializer=None,
                content_type=properties.pop("content_type"),
                content_encoding=properties.pop("content_encoding"),
                expiration=int(properties.pop("expiration")) / 1000,  # Kombu takes seconds
                **properties,
            )
            ids.append(correlation_id)
    return ids

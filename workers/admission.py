"""Whether a delivery may call its downstream: one rule for single and batch mode.

A pure decision on what the delivery and the worker's state say; ``workers.pipeline``
carries it out. Whether a job was cancelled is asked later, in the call thread, just
before its call (``workers.answering.start_job``): it needs the result store, and a
round trip to Redis must not stall the consumer thread that every request goes through.
"""

from __future__ import annotations

import enum
import time

from workers.delivery import Delivery


class Verdict(enum.Enum):
    CALL = "call"
    # Its deadline passed: nobody waits for the answer; acknowledged unseen.
    EXPIRED = "expired"
    # Delivered more than max_deliveries times: dead-lettered and answered ``poison``.
    DEAD = "dead"
    # Published again carrying its count, this delivery acknowledged: a classic queue's
    # redelivery (so that the count goes on), or a held request (the downstream is
    # unhealthy, or a job reached a worker without a result store) whose count stays
    # as it is (the service never saw it; a reject would count as a delivery).
    AGAIN = "again"


def admit(delivery: Delivery, healthy: bool, has_result_store: bool) -> Verdict:
    if delivery.due <= time.monotonic():
        return Verdict.EXPIRED
    if delivery.count > delivery.service.max_deliveries:
        return Verdict.DEAD
    headers = delivery.message.headers
    classic_redelivery = (
        bool((delivery.message.delivery_info or {}).get("redelivered"))
        and headers.get("x-delivery-count") is None
    )
    if classic_redelivery or not healthy or (delivery.request.job and not has_result_store):
        return Verdict.AGAIN
    return Verdict.CALL

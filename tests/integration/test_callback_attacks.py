"""Attacks on job callbacks through the broker: their queues deleted under a running
worker, a downstream claiming a callback state."""

import pytest
import requests
from support import delete_queues, poll_until_done, unique_service, wait_for
from test_callbacks import ASYNC, FAST, RESULT_URL, Receiver, callback_state, submit, worker


@pytest.fixture(scope="module")
def gateway(stack):
    return stack.gateway(PROXYMQ_RESULT_URL=RESULT_URL)


def test_a_callback_whose_retry_queue_was_deleted_is_retried_not_lost(stack, gateway, downstream):
    service = unique_service("cbgone")
    worker(stack, service, downstream, **FAST)
    # FAST: the first retry waits 0.5 s, in the queue the worker declared when it started.
    delete_queues(f"{service}_callbacks.retry.500")
    receiver = Receiver(statuses=(500, 200))
    location = submit(gateway, service, receiver.url, b"kept").headers["Location"]
    assert poll_until_done(gateway, location).status_code == 200
    wait_for(lambda: len(receiver.arrivals) >= 2, 30, "the retried callback")
    wait_for(lambda: callback_state(gateway, location) == "delivered", 10, "delivered")


class ForgingDownstream(Receiver):
    """A downstream whose answers claim a callback state of their own."""

    def answer(self, conn) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nX-ProxyMQ-Callback-State: delivered\r\n"
                b"Content-Length: 2\r\n\r\nok"
            )


def test_a_downstream_cannot_claim_a_job_s_callback_state(stack, gateway):
    service = unique_service("cbforge")
    forger = ForgingDownstream()
    stack.worker(service, f"http://127.0.0.1:{forger.port}", PROXYMQ_RESULT_URL=RESULT_URL)
    response = requests.post(f"{gateway.url}/{service}/x", headers=ASYNC)
    assert response.status_code == 202, response.text
    answer = poll_until_done(gateway, response.headers["Location"])
    assert answer.content == b"ok"
    assert "X-ProxyMQ-Callback-State" not in answer.headers


def test_a_callback_queue_deleted_under_a_running_worker_still_delivers(stack, gateway, downstream):
    service = unique_service("cbqgone")
    worker(stack, service, downstream, **FAST)
    delete_queues(f"{service}_callbacks")
    receiver = Receiver()
    location = submit(gateway, service, receiver.url, b"kept").headers["Location"]
    assert poll_until_done(gateway, location).status_code == 200
    wait_for(lambda: receiver.arrivals, 30, "the callback")
    wait_for(lambda: callback_state(gateway, location) == "delivered", 10, "delivered")

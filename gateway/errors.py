"""The catalogue of the errors the gateway answers itself: every code with its status.

One entry per code of the reference's table (docs/reference.md, "Statuses and error
codes"; ``tests/unit/test_error_catalogue.py`` holds the two together). Code that
refuses a request raises the entry's error (``BAD_REQUEST("...")``), never a status and
a code of its own making. The worker makes four of the codes (``MADE_BY_WORKER``) and
``timeout`` too: its reply names the code and the gateway answers it as its own error.

Every such answer carries ``X-ProxyMQ-Error: <code>`` and a JSON body
(``gateway.answers.error_answer``), so a client can always tell the gateway's own
errors from the downstream's answers.
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """A request ended without a downstream answer; rendered by ``error_answer``."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One code of the catalogue: its status, and ``Retry-After`` where it has one."""

    code: str
    status: int
    retry_after: int | None = None

    def __call__(
        self, message: str, status: int | None = None, retry_after: int | None = None
    ) -> GatewayError:
        """The error to raise. ``status`` only where the reference gives this code
        another one: ``bad-request`` for what gunicorn or werkzeug refuse with 414, 417
        or 501; a worker's code with the status its reply carries. ``retry_after`` where
        the wait is the request's own (a service's announced state)."""
        return GatewayError(
            status or self.status, self.code, message, retry_after or self.retry_after
        )


BAD_REQUEST = ErrorCode("bad-request", 400)
UNKNOWN_SERVICE = ErrorCode("unknown-service", 404)
UNKNOWN_JOB = ErrorCode("unknown-job", 404)
METHOD_NOT_ALLOWED = ErrorCode("method-not-allowed", 405)
BODY_TIMEOUT = ErrorCode("body-timeout", 408)
JOB_RUNNING = ErrorCode("job-running", 409)
ANONYMOUS_JOB_REPLAY = ErrorCode("anonymous-job-replay", 409)
BODY_TOO_LARGE = ErrorCode("body-too-large", 413)
IDEMPOTENCY_KEY_REUSED = ErrorCode("idempotency-key-reused", 422)
HEADERS_TOO_LARGE = ErrorCode("headers-too-large", 431)
INTERNAL_ERROR = ErrorCode("internal-error", 500)
ASYNC_UNAVAILABLE = ErrorCode("async-unavailable", 501)
IDEMPOTENCY_UNAVAILABLE = ErrorCode("idempotency-unavailable", 501)
DOWNSTREAM_UNAVAILABLE = ErrorCode("downstream-unavailable", 502)
POISON = ErrorCode("poison", 502)
BAD_BATCH_RESPONSE = ErrorCode("bad-batch-response", 502)
BAD_REPLY = ErrorCode("bad-reply", 502)
RESPONSE_TOO_LARGE = ErrorCode("response-too-large", 502)
BROKER_UNAVAILABLE = ErrorCode("broker-unavailable", 503, retry_after=5)
QUEUE_FULL = ErrorCode("queue-full", 503, retry_after=1)
RESULT_STORE_UNAVAILABLE = ErrorCode("result-store-unavailable", 503, retry_after=5)
# Answered at once from the service's announced state; Retry-After is the wait it names.
SERVICE_UNAVAILABLE = ErrorCode("service-unavailable", 503)
DEADLINE_UNREACHABLE = ErrorCode("deadline-unreachable", 503)
TIMEOUT = ErrorCode("timeout", 504)

CATALOGUE: dict[str, ErrorCode] = {
    entry.code: entry for entry in list(globals().values()) if isinstance(entry, ErrorCode)
}
# Made in the worker's reply (workers/forwarding.py, batch_call.py, poison.py); the
# gateway never raises them, it answers them as the reply names them.
MADE_BY_WORKER = frozenset(
    {"downstream-unavailable", "poison", "bad-batch-response", "response-too-large"}
)


def bad_request(message: str) -> GatewayError:
    return BAD_REQUEST(message)


def unknown_service(service: str) -> GatewayError:
    return UNKNOWN_SERVICE(f"no service named {service!r}")


def broker_unavailable(message: str = "the message broker cannot be reached") -> GatewayError:
    return BROKER_UNAVAILABLE(message)


def queue_full(service: str) -> GatewayError:
    return QUEUE_FULL(f"the queue of {service!r} is full; retry later")


def service_unavailable(service: str, retry_after: int) -> GatewayError:
    message = f"{service!r} is not taking calls for {retry_after} s"
    return SERVICE_UNAVAILABLE(message, retry_after=retry_after)


def deadline_unreachable(service: str, retry_after: int) -> GatewayError:
    message = f"{service!r} would start this request in about {retry_after} s, past its deadline"
    return DEADLINE_UNREACHABLE(message, retry_after=retry_after)


def timeout(seconds: float) -> GatewayError:
    return TIMEOUT(f"no reply within {seconds:g} s")


def body_too_large(limit: int) -> GatewayError:
    return BODY_TOO_LARGE(f"request body over the limit of {limit} bytes")


def body_timeout(seconds: float) -> GatewayError:
    return BODY_TIMEOUT(f"the request body did not arrive within {seconds:g} seconds")


def result_store_unavailable() -> GatewayError:
    return RESULT_STORE_UNAVAILABLE("the result store cannot be reached")

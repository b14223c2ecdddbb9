"""Errors the gateway answers itself, with the codes of the reference (docs/reference.md).

Every such answer carries ``X-ProxyMQ-Error: <code>`` and a JSON body
(``gateway.answers.error_answer``), so a client can always tell the gateway's own
errors from the downstream's answers.
"""

from __future__ import annotations


class GatewayError(Exception):
    """A request ended without a downstream answer; rendered by ``error_response``."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, "bad-request", message)


def unknown_service(service: str) -> GatewayError:
    return GatewayError(404, "unknown-service", f"no service named {service!r}")


def broker_unavailable(message: str = "the message broker cannot be reached") -> GatewayError:
    return GatewayError(503, "broker-unavailable", message, retry_after=5)


def queue_full(service: str) -> GatewayError:
    return GatewayError(
        503, "queue-full", f"the queue of {service!r} is full; retry later", retry_after=1
    )


def timeout(seconds: float) -> GatewayError:
    return GatewayError(504, "timeout", f"no reply within {seconds:g} s")


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, "body-too-large", f"request body over the limit of {limit} bytes")


def body_timeout(seconds: float) -> GatewayError:
    return GatewayError(
        408, "body-timeout", f"the request body did not arrive within {seconds:g} seconds"
    )

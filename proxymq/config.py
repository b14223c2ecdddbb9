"""Per-process settings: read once at start, validated, one typed object per process.

``GatewayConfig`` for a gateway, ``WorkerConfig`` (with a ``ServiceConfig`` per served
queue) for a worker; what both read is declared once, in ``SharedConfig``. The values'
rules are ``proxymq.parsers``'s, TLS to the broker is ``proxymq.broker_tls``'s. Every
problem is a ``ConfigError`` of one line naming the variable.

A process parses its settings once. The broker's part (``BrokerLink``) may be read
earlier than the rest, on its own, and then handed to ``from_env``: the workers' Celery
app needs it when ``workers`` is imported, the rest only once ``-Q`` is known.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from proxymq.broker_tls import BrokerTLS, broker_tls
from proxymq.parsers import (
    QUEUE_SUFFIX,
    ConfigError,
    bind_address,
    boolean,
    broker_url_list,
    callback_retries,
    header_name,
    http_url,
    is_service_name,
    max_priority,
    port,
    positive_int,
    positive_number,
    queue_name,
    queue_type,
    read,
    redis_url,
    service_list,
    service_name,
    shown_value,
    user_list,
)

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672//"


@dataclass(frozen=True, slots=True)
class BrokerLink:
    """``PROXYMQ_BROKER_URL`` and TLS to it (its files read and checked), parsed first."""

    url: str = DEFAULT_BROKER_URL
    tls: BrokerTLS | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BrokerLink:
        url = read(env, "PROXYMQ_BROKER_URL", broker_url_list, DEFAULT_BROKER_URL)
        return cls(url, broker_tls(env, url))


@dataclass(frozen=True, slots=True)
class SharedConfig:
    """The settings of both the gateway and the workers: the broker, the job store (Redis)
    and how long a job's result is kept there, and how long a stream may stay silent."""

    broker_url: str = DEFAULT_BROKER_URL
    broker_tls: BrokerTLS | None = None
    result_url: str | None = None
    job_ttl: int = 3600
    stream_idle_timeout: float = 30.0


def _shared(env: Mapping[str, str], broker: BrokerLink) -> dict[str, Any]:
    """``SharedConfig``'s fields, for a subclass's constructor."""
    d = SharedConfig()
    return {
        "broker_url": broker.url,
        "broker_tls": broker.tls,
        "result_url": read(env, "PROXYMQ_RESULT_URL", redis_url, d.result_url),
        "job_ttl": read(env, "PROXYMQ_JOB_TTL", positive_int, d.job_ttl),
        "stream_idle_timeout": read(
            env, "PROXYMQ_STREAM_IDLE_TIMEOUT", positive_number, d.stream_idle_timeout
        ),
    }


# -- gateway --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayConfig(SharedConfig):
    bind: str = "0.0.0.0:8000"
    services: frozenset[str] | None = None
    reply_timeout: float = 120.0
    max_body_bytes: int = 10 * 1024 * 1024
    max_header_bytes: int = 32 * 1024
    job_timeout: float = 3600.0
    job_auth_header: str = "Authorization"
    body_timeout: float = 30.0
    reply_users: frozenset[str] | None = None
    stream_buffer_bytes: int = 1024 * 1024
    idempotency_ttl: int = 86400
    max_client_priority: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], broker: BrokerLink | None = None) -> GatewayConfig:
        """The gateway's settings; ``broker`` when the caller already read that part."""
        broker = broker or BrokerLink.from_env(env)
        d = cls()
        own = {
            "bind": read(env, "PROXYMQ_GATEWAY_BIND", bind_address, d.bind),
            "services": read(env, "PROXYMQ_SERVICES", service_list, d.services),
            "reply_timeout": read(env, "PROXYMQ_REPLY_TIMEOUT", positive_number, d.reply_timeout),
            "max_body_bytes": read(env, "PROXYMQ_MAX_BODY_BYTES", positive_int, d.max_body_bytes),
            "max_header_bytes": read(
                env, "PROXYMQ_MAX_HEADER_BYTES", positive_int, d.max_header_bytes
            ),
            "job_timeout": read(env, "PROXYMQ_JOB_TIMEOUT", positive_number, d.job_timeout),
            "job_auth_header": read(env, "PROXYMQ_JOB_AUTH_HEADER", header_name, d.job_auth_header),
            "body_timeout": read(env, "PROXYMQ_BODY_TIMEOUT", positive_number, d.body_timeout),
            "reply_users": read(env, "PROXYMQ_REPLY_USERS", user_list, d.reply_users),
            "stream_buffer_bytes": read(
                env, "PROXYMQ_STREAM_BUFFER_BYTES", positive_int, d.stream_buffer_bytes
            ),
            "idempotency_ttl": read(
                env, "PROXYMQ_IDEMPOTENCY_TTL", positive_int, d.idempotency_ttl
            ),
            "max_client_priority": read(
                env, "PROXYMQ_MAX_CLIENT_PRIORITY", max_priority, d.max_client_priority
            ),
        }
        return cls(**own, **_shared(env, broker))


# -- workers --------------------------------------------------------------------------------

# Flow control's own values (workers.flow), by the rules of ``proxymq.parsers``.
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_COUNT = re.compile(r"[0-9]{1,4}")
_SHARE = re.compile(r"[0-9]+(?:\.[0-9]+)?")


@dataclass(frozen=True, slots=True)
class Rate:
    """``PROXYMQ_RATE_LIMIT``: ``calls`` started per ``period`` seconds."""

    calls: int
    period: float

    @property
    def per_second(self) -> float:
        return self.calls / self.period


def rate(text: str) -> Rate:
    """``<n>/<s|m|h>``: n calls per second, minute or hour."""
    calls, sep, unit = text.partition("/")
    if not sep or unit not in _PERIODS:
        raise ValueError("must be <n>/<s|m|h>, e.g. 10/s")
    return Rate(positive_int(calls), _PERIODS[unit])


def concurrency(text: str) -> int | str:
    """``PROXYMQ_MAX_CONCURRENCY``: a positive integer, or ``auto``."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except ValueError:
        raise ValueError("must be a positive integer or 'auto'") from None


def count(text: str) -> int:
    """A number of times: plain digits, 0 allowed."""
    if _COUNT.fullmatch(text) and int(text) <= 1000:
        return int(text)
    raise ValueError("must be an integer from 0 to 1000")


def fraction(text: str) -> float:
    """A share: a plain decimal from 0 to 1."""
    if _SHARE.fullmatch(text) and float(text) <= 1:
        return float(text)
    raise ValueError("must be a decimal from 0 to 1")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Everything a worker needs to serve one service (one ``<name>_requests`` queue)."""

    name: str
    downstream_url: str
    batch_url: str | None = None
    batch_size: int = 10
    batch_wait_ms: float = 20.0
    downstream_timeout: float = 60.0
    queue_max_length: int | None = None
    queue_type: str = "classic"
    batch_concurrency: int = 1
    max_deliveries: int = 3
    health_url: str | None = None
    max_priority: int | None = None
    # Flow control (workers.flow); the service-wide ones need PROXYMQ_RESULT_URL.
    max_concurrency: int | str | None = None  # a number, or "auto"
    min_concurrency: int = 1
    auto_max_concurrency: int = 256
    rate_limit: Rate | None = None
    rate_burst: int | None = None
    max_pause: float = 60.0
    breaker_failures: int | None = None
    breaker_open: float = 10.0
    retries: int = 0
    retry_backoff_ms: float = 100.0
    retry_budget: float = 0.2

    @property
    def queue(self) -> str:
        return queue_name(self.name)

    @property
    def shared_limits(self) -> list[str]:
        """The service-wide limits set (by variable name): each needs the shared Redis."""
        limits = {
            "PROXYMQ_MAX_CONCURRENCY": self.max_concurrency,
            "PROXYMQ_RATE_LIMIT": self.rate_limit,
            "PROXYMQ_BREAKER_FAILURES": self.breaker_failures,
        }
        return [name for name, value in limits.items() if value is not None]


# Per-service keys: TOML key -> parser. The environment variable is PROXYMQ_<KEY upper>.
SERVICE_KEYS: dict[str, Callable[[str], Any]] = {
    "downstream_url": http_url,
    "batch_url": http_url,
    "batch_size": positive_int,
    "batch_wait_ms": positive_number,
    "downstream_timeout": positive_number,
    "queue_max_length": positive_int,
    "queue_type": queue_type,
    "batch_concurrency": positive_int,
    "max_deliveries": positive_int,
    "health_url": http_url,
    "max_priority": max_priority,
    "max_concurrency": concurrency,
    "min_concurrency": positive_int,
    "auto_max_concurrency": positive_int,
    "rate_limit": rate,
    "rate_burst": positive_int,
    "max_pause": positive_number,
    "breaker_failures": positive_int,
    "breaker_open": positive_number,
    "retries": count,
    "retry_backoff_ms": positive_number,
    "retry_budget": fraction,
}
assert set(SERVICE_KEYS) == {f.name for f in fields(ServiceConfig)} - {"name"}


@dataclass(frozen=True, slots=True)
class WorkerConfig(SharedConfig):
    services: dict[str, ServiceConfig] = field(default_factory=dict)
    metrics_port: int = 8001
    callback_secret: str | None = None
    callback_allow_private: bool = False
    callback_retries: int = 5
    # Test-only: the callback retry delays times this (docs/reference.md).
    callback_delay_scale: float = 1.0
    task_events: bool = True
    max_response_bytes: int = 10 * 1024 * 1024
    cancel_users: frozenset[str] | None = None

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        queues: list[str] | None = None,
        broker: BrokerLink | None = None,
    ) -> WorkerConfig:
        """Build the worker's configuration.

        ``queues`` are the queue names given with ``-Q``; the worker serves exactly those
        services. Without ``-Q`` it serves every service of the TOML file, or the one
        named by ``PROXYMQ_SERVICE``. ``broker``: that part, when the caller (the
        workers' Celery app, at import) already read it.
        """
        broker = broker or BrokerLink.from_env(env)
        d = cls()
        own = {
            "services": _services(env, queues),
            "metrics_port": read(env, "PROXYMQ_WORKER_METRICS_PORT", port, d.metrics_port),
            "callback_secret": read(env, "PROXYMQ_CALLBACK_SECRET", str, d.callback_secret),
            "callback_allow_private": read(
                env, "PROXYMQ_CALLBACK_ALLOW_PRIVATE", boolean, d.callback_allow_private
            ),
            "callback_retries": read(
                env, "PROXYMQ_CALLBACK_RETRIES", callback_retries, d.callback_retries
            ),
            "callback_delay_scale": read(
                env, "PROXYMQ_CALLBACK_DELAY_SCALE", positive_number, d.callback_delay_scale
            ),
            "task_events": read(env, "PROXYMQ_TASK_EVENTS", boolean, d.task_events),
            "max_response_bytes": read(
                env, "PROXYMQ_MAX_RESPONSE_BYTES", positive_int, d.max_response_bytes
            ),
            "cancel_users": read(env, "PROXYMQ_CANCEL_USERS", user_list, d.cancel_users),
        }
        return _flow_checked(cls(**own, **_shared(env, broker)))


def _flow_checked(config: WorkerConfig) -> WorkerConfig:
    """A service-wide limit is shared through Redis: without it, it cannot hold."""
    for service in config.services.values():
        for variable in service.shared_limits:
            if config.result_url is None:
                raise ConfigError(
                    variable,
                    f"is set for service {service.name!r}, but a service-wide limit is kept "
                    "in Redis and PROXYMQ_RESULT_URL is not set",
                )
    return config


def _services(env: Mapping[str, str], queues: list[str] | None) -> dict[str, ServiceConfig]:
    path = read(env, "PROXYMQ_CONFIG", str, None)
    file_services = _read_toml(path) if path is not None else {}
    env_service = read(env, "PROXYMQ_SERVICE", service_name, None)
    names = _served_names(queues, file_services, env_service)
    env_values = {
        key: read(env, "PROXYMQ_" + key.upper(), parse, None) for key, parse in SERVICE_KEYS.items()
    }
    env_values = {key: value for key, value in env_values.items() if value is not None}
    services = {}
    for name in names:
        values = dict(file_services.get(name, {}))
        if env_service in (None, name):
            values.update(env_values)
        if "downstream_url" not in values:
            raise ConfigError(
                "PROXYMQ_DOWNSTREAM_URL", f"not set for service {name!r} (nor in PROXYMQ_CONFIG)"
            )
        services[name] = _checked(ServiceConfig(name=name, **values))
    return services


def _checked(service: ServiceConfig) -> ServiceConfig:
    """Combinations the broker would refuse when the worker declares the queue, or that
    contradict themselves."""
    if service.min_concurrency > service.auto_max_concurrency:
        raise ConfigError(
            "PROXYMQ_MIN_CONCURRENCY",
            f"is above PROXYMQ_AUTO_MAX_CONCURRENCY for service {service.name!r}",
        )
    if service.max_priority is not None and service.queue_type == "quorum":
        # RabbitMQ before 4.0 refuses x-max-priority on a quorum queue (PRECONDITION_FAILED).
        raise ConfigError(
            "PROXYMQ_MAX_PRIORITY",
            f"service {service.name!r} has a quorum queue, which supports no priorities "
            "on RabbitMQ before 4.0; use a classic queue or unset it",
        )
    return service


def _served_names(
    queues: list[str] | None, file_services: Mapping[str, dict], env_service: str | None
) -> list[str]:
    if queues:
        names = []
        for queue in queues:
            name = queue.removesuffix(QUEUE_SUFFIX)
            if queue == name or not is_service_name(name):
                raise ConfigError("-Q", f"queue {queue!r} is not a '<service>_requests' queue")
            if env_service not in (None, name) and name not in file_services:
                raise ConfigError("PROXYMQ_SERVICE", f"is {env_service!r}, but -Q names {queue!r}")
            names.append(name)
        return names
    names = sorted(set(file_services) | ({env_service} if env_service else set()))
    if not names:
        raise ConfigError("PROXYMQ_SERVICE", "not set, and no -Q queue or PROXYMQ_CONFIG service")
    return names


def _read_toml(path: str) -> dict[str, dict]:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError("PROXYMQ_CONFIG", f"cannot read {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("PROXYMQ_CONFIG", f"{path!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"services"})
    if unknown:
        raise ConfigError("PROXYMQ_CONFIG", f"unknown key {unknown[0]!r} in {path!r}")
    services = {}
    for name, table in document.get("services", {}).items():
        where = f"[services.{name}]"
        if not is_service_name(name) or not isinstance(table, dict):
            raise ConfigError("PROXYMQ_CONFIG", f"{where} is not a valid service table")
        services[name] = {key: _toml_value(where, key, value) for key, value in table.items()}
    return services


def _toml_value(where: str, key: str, value: Any) -> Any:
    parse = SERVICE_KEYS.get(key)
    if parse is None:
        raise ConfigError("PROXYMQ_CONFIG", f"unknown key {key!r} in {where}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError("PROXYMQ_CONFIG", f"{where} {key} must be a string or a number")
    try:
        return parse(str(value))
    except ValueError as exc:
        raise ConfigError(
            "PROXYMQ_CONFIG", f"{where} {key} {exc} (got {shown_value(parse, value)})"
        ) from None

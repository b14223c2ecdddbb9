"""Configuration: read once at start, validated, one typed object per process.

Every problem is a ``ConfigError`` whose text is one line naming the variable, so a
process with bad settings stops at once with a message an operator can act on, never
with a traceback or a silently substituted default.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

SERVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESERVED_NAMES = frozenset({"healthz", "readyz", "metrics", "jobs"})
QUEUE_SUFFIX = "_requests"
DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672//"


class ConfigError(Exception):
    """A setting is missing or malformed; ``str()`` is one line naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


def queue_name(service: str) -> str:
    return service + QUEUE_SUFFIX


def is_service_name(name: str) -> bool:
    return SERVICE_NAME.fullmatch(name) is not None and name not in RESERVED_NAMES


# -- parsers: each takes the raw text and returns the value or raises ValueError -----------


def _number(convert: Callable[[str], Any], low: float, high: float, meaning: str):
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise ValueError(f"must be {meaning}")
        return value

    return parse


_positive_int = _number(int, 1, 2**63, "a positive integer")
_positive_float = _number(float, 1e-3, 1e9, "a positive number")
_port = _number(int, 1, 65535, "a port number between 1 and 65535")


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        parts = urlsplit(text)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"must be a {'/'.join(schemes)} URL with a host")
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
        return text

    return parse


_http_url = _url(("http", "https"))
_broker_url = _url(("amqp", "amqps", "pyamqp"))
_redis_url = _url(("redis", "rediss"))


def _bind(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    _port(port)
    return text


def _service_list(text: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    bad = sorted(name for name in names if not is_service_name(name))
    if bad or not names:
        raise ValueError(f"must be a comma-separated list of service names, bad: {bad}")
    return names


def _queue_type(text: str) -> str:
    if text not in ("classic", "quorum"):
        raise ValueError("must be 'classic' or 'quorum'")
    return text


def _header_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9-]+", text):
        raise ValueError("must be an HTTP header name")
    return text


def _bool(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError("must be 'true' or 'false'")
    return text == "true"


def _text(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


def _read(env: Mapping[str, str], name: str, parse: Callable[[str], Any], default: Any) -> Any:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise ConfigError(name, f"{exc} (got {raw!r})") from None


def broker_url(env: Mapping[str, str]) -> str:
    return _read(env, "PROXYMQ_BROKER_URL", _broker_url, DEFAULT_BROKER_URL)


# -- gateway --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    broker_url: str = DEFAULT_BROKER_URL
    bind: str = "0.0.0.0:8000"
    services: frozenset[str] | None = None
    reply_timeout: float = 120.0
    max_body_bytes: int = 10 * 1024 * 1024
    max_header_bytes: int = 32 * 1024
    result_url: str | None = None
    job_ttl: int = 3600
    job_timeout: float = 3600.0
    job_auth_header: str = "Authorization"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GatewayConfig:
        d = cls()
        return cls(
            broker_url=broker_url(env),
            bind=_read(env, "PROXYMQ_GATEWAY_BIND", _bind, d.bind),
            services=_read(env, "PROXYMQ_SERVICES", _service_list, d.services),
            reply_timeout=_read(env, "PROXYMQ_REPLY_TIMEOUT", _positive_float, d.reply_timeout),
            max_body_bytes=_read(env, "PROXYMQ_MAX_BODY_BYTES", _positive_int, d.max_body_bytes),
            max_header_bytes=_read(
                env, "PROXYMQ_MAX_HEADER_BYTES", _positive_int, d.max_header_bytes
            ),
            result_url=_read(env, "PROXYMQ_RESULT_URL", _redis_url, d.result_url),
            job_ttl=_read(env, "PROXYMQ_JOB_TTL", _positive_int, d.job_ttl),
            job_timeout=_read(env, "PROXYMQ_JOB_TIMEOUT", _positive_float, d.job_timeout),
            job_auth_header=_read(env, "PROXYMQ_JOB_AUTH_HEADER", _header_name, d.job_auth_header),
        )


# -- workers --------------------------------------------------------------------------------


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

    @property
    def queue(self) -> str:
        return queue_name(self.name)


# Per-service keys: TOML key -> parser. The environment variable is PROXYMQ_<KEY upper>.
SERVICE_KEYS: dict[str, Callable[[str], Any]] = {
    "downstream_url": _http_url,
    "batch_url": _http_url,
    "batch_size": _positive_int,
    "batch_wait_ms": _positive_float,
    "downstream_timeout": _positive_float,
    "queue_max_length": _positive_int,
    "queue_type": _queue_type,
    "batch_concurrency": _positive_int,
    "max_deliveries": _positive_int,
    "health_url": _http_url,
}
assert set(SERVICE_KEYS) == {f.name for f in fields(ServiceConfig)} - {"name"}


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    broker_url: str
    services: dict[str, ServiceConfig]
    metrics_port: int = 8001
    result_url: str | None = None
    job_ttl: int = 3600
    callback_secret: str | None = None
    callback_allow_private: bool = False
    task_events: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str], queues: list[str] | None = None) -> WorkerConfig:
        """Build the worker's configuration.

        ``queues`` are the queue names given with ``-Q``; the worker serves exactly those
        services. Without ``-Q`` it serves every service of the TOML file, or the one
        named by ``PROXYMQ_SERVICE``.
        """
        return cls(
            broker_url=broker_url(env),
            services=_services(env, queues),
            metrics_port=_read(env, "PROXYMQ_WORKER_METRICS_PORT", _port, 8001),
            result_url=_read(env, "PROXYMQ_RESULT_URL", _redis_url, None),
            job_ttl=_read(env, "PROXYMQ_JOB_TTL", _positive_int, 3600),
            callback_secret=_read(env, "PROXYMQ_CALLBACK_SECRET", _text, None),
            callback_allow_private=_read(env, "PROXYMQ_CALLBACK_ALLOW_PRIVATE", _bool, False),
            task_events=_read(env, "PROXYMQ_TASK_EVENTS", _bool, True),
        )


def _services(env: Mapping[str, str], queues: list[str] | None) -> dict[str, ServiceConfig]:
    file_services = _read_toml(env["PROXYMQ_CONFIG"]) if env.get("PROXYMQ_CONFIG") else {}
    env_service = _read(env, "PROXYMQ_SERVICE", _service_name, None)
    names = _served_names(queues, file_services, env_service)
    env_values = {
        key: _read(env, "PROXYMQ_" + key.upper(), parse, None)
        for key, parse in SERVICE_KEYS.items()
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
        services[name] = ServiceConfig(name=name, **values)
    return services


def _service_name(text: str) -> str:
    if not is_service_name(text):
        raise ValueError("must match [A-Za-z0-9_-]{1,64} and not be a reserved name")
    return text


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
        raise ConfigError("PROXYMQ_CONFIG", f"{where} {key} {exc} (got {value!r})") from None

"""Configuration: read once at start, validated, one typed object per process.

Every problem is a ``ConfigError`` whose text is one line naming the variable, so a
process with bad settings stops at once with a message an operator can act on, never
with a traceback or a silently substituted default.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

if TYPE_CHECKING:
    import ssl  # at run time only with amqps: see broker_tls

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


# -- parsers --------------------------------------------------------------------------------
# Each takes the stripped, non-blank text (see ``read``) and returns the value or raises
# ValueError naming the problem. One rule set for every process (gateway, workers, fetcher):
#
# * the value is stripped of surrounding whitespace, and a variable that is set but blank
#   is an error (``read``), never a silent default: "unset" is how to ask for the default;
# * integers are plain ASCII decimal digits, numbers plain decimals (``2``, ``1.5``);
# * booleans are exactly ``true`` or ``false``.
#
# int() and float() are not used to decide what is valid, because they accept more than an
# operator would mean: int() takes "+5", "-1", "1_000", " 5" and non-ASCII digits (Arabic-
# Indic, fullwidth...), float() also "nan", "inf", "1e3" and "1_0". They only convert text
# a pattern accepted; ``[0-9]``, unlike ``\d``, matches ASCII digits only. Integers are
# capped at 30 digits, far past any range here, because int() refuses more than 4300
# digits with its own message.

_INTEGER = re.compile(r"[0-9]{1,30}")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _integer_in(text: str, low: int, high: int, meaning: str) -> int:
    if _INTEGER.fullmatch(text) and low <= int(text) <= high:
        return int(text)
    raise ValueError(f"must be {meaning}")


def positive_int(text: str) -> int:
    """A count or size: plain digits, at least 1."""
    return _integer_in(text, 1, 2**63, "a positive integer")


def _port(text: str) -> int:
    return _integer_in(text, 1, 65535, "a port number between 1 and 65535")


def positive_number(text: str) -> float:
    """A duration or rate: a plain decimal (``2``, ``1.5``) from 0.001 to 10⁹.

    The bounds keep a typo from becoming a timeout of zero or of centuries.
    """
    if _DECIMAL.fullmatch(text) and 1e-3 <= float(text) <= 1e9:
        return float(text)
    raise ValueError("must be a positive number")


def boolean(text: str) -> bool:
    """Exactly ``true`` or ``false``: "1", "yes" or "True" would be guesses, and guessing
    wrong on a safety switch is worse than refusing to start."""
    if text not in ("true", "false"):
        raise ValueError("must be 'true' or 'false', lower case")
    return text == "true"


# -- URLs: they may hold credentials ---------------------------------------------------------
# A URL setting's user info (amqp://user:password@host) or query (redis://host/0?password=…)
# may be a secret, so no message ever quotes one as given: ``read`` shows it through
# ``redact_url``, and the parsers' own messages never quote it (urllib's do: "Port could
# not be cast to integer value as '<part of the password>'").

REDACTED = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_HOST_PORT = re.compile(r"(?:[A-Za-z0-9._~-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
_AFTER_HOST = re.compile(r"([^/?#]*)([^?#]*)(.*)", re.DOTALL)
_UNENCODED = (
    "; a '/', '?' or '#' in its user name or password must be percent-encoded (%2F, %3F, %23)"
)


def redact_url(text: str) -> str:
    """``text``, a URL or a ``;`` list of them, as a message may show it: scheme, host, port
    and path, with the user info, query and fragment replaced by ``***``.

    It does not trust urlsplit, which reads a password holding an unencoded ``/``, ``?`` or
    ``#`` as host and port: the user info ends at the *last* ``@``, a host part that is not
    a plain ``host[:port]`` is hidden too, and so is anything that is not ``scheme://…``.
    """
    return ";".join(_redacted(url.strip()) for url in text.split(";"))


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return REDACTED
    _, at, rest = rest.rpartition("@")
    host, path, hidden = _AFTER_HOST.fullmatch(rest).groups()
    if not _HOST_PORT.fullmatch(host):
        host = REDACTED
    return (
        f"{scheme}://{REDACTED + '@' if at else ''}{host}{path}"
        f"{hidden[:1] + REDACTED if hidden else ''}"
    )


def _url(schemes: tuple[str, ...], path_holds_at: bool = True) -> Callable[[str], str]:
    """A parser of URLs of ``schemes``. ``path_holds_at=False`` for the brokers' URLs
    (AMQP's path is a vhost, Redis's a database number): there an ``@`` after the host can
    only be the end of user info that urllib misread, and the client library would then
    connect elsewhere and log the rest of the password as the path."""

    def parse(text: str) -> str:
        parts = urlsplit(text)
        misread = "@" in parts.path + parts.query + parts.fragment
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"must be a {'/'.join(schemes)} URL with a host")
        try:
            parts.port  # noqa: B018 -- raises ValueError for a malformed port
        except ValueError:
            raise ValueError("must have a valid port" + (_UNENCODED if misread else "")) from None
        if misread and not path_holds_at:
            raise ValueError("has an '@' after its host" + _UNENCODED)
        return text

    _URL_PARSERS.add(parse)
    return parse


_URL_PARSERS: set[Callable[[str], str]] = set()
_http_url = _url(("http", "https"))
_one_broker_url = _url(("amqp", "amqps", "pyamqp"), path_holds_at=False)


def _broker_url(text: str) -> str:
    """One broker URL, or several separated by ``;``: Kombu's failover list, e.g. a
    cluster's nodes, tried in turn. Each is checked on its own; all of them plain AMQP or
    all ``amqps://`` (a list that mixes them would sometimes connect without TLS)."""
    urls = [part.strip() for part in text.split(";")]
    if len(urls) == 1:
        return _one_broker_url(text)
    for number, url in enumerate(urls, 1):
        if not url:
            raise ValueError(f"URL {number} of the ';'-separated list is blank")
        try:
            _one_broker_url(url)
        except ValueError as exc:
            raise ValueError(f"URL {number} of the ';'-separated list {exc}") from None
    if len({urlsplit(url).scheme == "amqps" for url in urls}) > 1:
        raise ValueError("mixes amqps:// and plain AMQP URLs in its ';'-separated list")
    return ";".join(urls)


_URL_PARSERS.add(_broker_url)


def broker_urls(url: str) -> list[str]:
    """The URLs of a valid ``PROXYMQ_BROKER_URL``, in the order given."""
    return url.split(";")


_redis_url = _url(("redis", "rediss"), path_holds_at=False)


def bind_address(text: str) -> str:
    """Where a server listens: ``HOST:PORT``, the port plain digits (gunicorn's ``-b``)."""
    host, sep, number = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    _port(number)
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


def _max_priority(text: str) -> int:
    """A queue's highest priority: RabbitMQ takes 1 to 255 (its docs advise at most 10)."""
    return _integer_in(text, 1, 255, "an integer from 1 to 255")


def _user_list(text: str) -> frozenset[str]:
    """Broker user names: AMQP's ``user_id`` is a short string, compared exactly."""
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError("must be a comma-separated list of broker user names")
    return names


def _header_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9-]+", text):
        raise ValueError("must be an HTTP header name")
    return text


def read(env: Mapping[str, str], name: str, parse: Callable[[str], Any], default: Any) -> Any:
    """The value of variable ``name``: ``default`` when unset, else ``parse`` of its text.

    The text is stripped first; set but blank is an error, because a blank left by a
    template (``VAR=``) is more likely a mistake than a request for the default. Every
    problem is a ``ConfigError`` of one line, ``NAME: problem (got '<raw value>')``;
    ``repr()`` keeps it one line even if the value holds a newline, and a URL is shown
    redacted (``_shown``).
    """
    raw = env.get(name)
    if raw is None:
        return default
    text = raw.strip()
    if not text:
        raise ConfigError(name, f"is set but blank; unset it to mean the default (got {raw!r})")
    try:
        return parse(text)
    except ValueError as exc:
        raise ConfigError(name, f"{exc} (got {_shown(parse, raw)})") from None


def _shown(parse: Callable[[str], Any], raw: object) -> str:
    """How an error quotes the value ``raw`` that ``parse`` refused: a URL's secrets
    hidden (``redact_url``), in ``repr()`` to keep the message one line."""
    return repr(redact_url(str(raw)) if parse in _URL_PARSERS else raw)


def broker_url(env: Mapping[str, str]) -> str:
    return read(env, "PROXYMQ_BROKER_URL", _broker_url, DEFAULT_BROKER_URL)


# -- TLS to the broker ----------------------------------------------------------------------
# ``amqps://`` verifies the broker's certificate chain and its host name. Left to itself,
# py-amqp's ``ssl=True`` (what Kombu and Celery pass for ``amqps://``) checks the chain
# against the system's CAs but not the host name, so any certificate a trusted CA signed
# for any name would do, and the PLAIN credentials would go to whoever holds it. These
# settings are turned into the options dict py-amqp's SSLTransport takes (a dict, never
# an ``ssl.SSLContext``: py-amqp silently drops anything that is not a dict). A
# ``;``-separated list gets one such dict per node, each naming its own node's host: the
# gateway passes each to that URL's connection, the workers' Celery connections rename
# the host when they fail over (``workers.failover``).

BROKER_TLS_VARIABLES = (
    "PROXYMQ_BROKER_CA_FILE",
    "PROXYMQ_BROKER_CERT_FILE",
    "PROXYMQ_BROKER_KEY_FILE",
)
AMQPS_PORT = 5671
# OpenSSL's verify codes for "the certificate does not name this host / IP address".
_NAME_MISMATCH = frozenset({62, 64})


@dataclass(frozen=True, slots=True)
class BrokerNode:
    """One URL of ``PROXYMQ_BROKER_URL``: its host, the name the node's certificate must
    be valid for, and its port."""

    host: str
    port: int = AMQPS_PORT

    @property
    def address(self) -> str:
        """``HOST:PORT`` as py-amqp takes it (an IPv6 literal in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BrokerTLS:
    """How to check the brokers of an ``amqps://`` URL or list, and how to prove who we are.

    ``nodes`` are the URLs' hosts and ports, in the list's order: each node's certificate
    is checked against its own host, never against another node's (a cluster's nodes
    usually have a certificate each). ``ca_file`` unset means the system's CAs; set, only
    that CA is trusted. ``cert_file`` and ``key_file`` (both or neither) are a client
    certificate, for a broker with ``fail_if_no_peer_cert``.
    """

    nodes: tuple[BrokerNode, ...]
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def ssl_options(self, host: str) -> dict[str, Any]:
        """The ``ssl`` argument of a Kombu connection to ``host`` (Celery's
        ``broker_use_ssl`` for the first node); only ``server_hostname`` differs by host.

        ``server_hostname`` is what makes py-amqp check the host name (and send SNI); it
        is given explicitly because Kombu rewrites ``localhost`` to ``127.0.0.1``. A new
        dict on every call, so that no two connections share one: Kombu may write into
        the dict it is given, and a shared one would carry one node's name to the others.
        """
        import ssl  # only with amqps: see broker_tls

        options: dict[str, Any] = {"server_hostname": host, "cert_reqs": ssl.CERT_REQUIRED}
        if self.ca_file is not None:
            options["ca_certs"] = self.ca_file
        if self.cert_file is not None:
            options["certfile"] = self.cert_file
            options["keyfile"] = self.key_file
        return options


def broker_tls(env: Mapping[str, str], url: str) -> BrokerTLS | None:
    """The TLS settings for broker ``url`` (already valid: a list is all ``amqps://`` or
    none), or None for plain ``amqp://``.

    The files are read and parsed here, so a missing, unreadable or wrong file stops the
    process at start with one line instead of failing every connection attempt later
    (and a pass-phrase-protected key cannot make OpenSSL prompt on a terminal). A CA or
    client certificate with a URL that is not ``amqps://`` is an error: the operator
    believes the link is encrypted and it would not be.
    """
    urls = [urlsplit(one) for one in broker_urls(url)]
    ssl_keys = [
        key
        for parts in urls
        for key, _ in parse_qsl(parts.query)
        if key == "ssl" or key.startswith("ssl_")
    ]
    if ssl_keys:
        # Kombu lets them replace the whole ssl argument, host name check included.
        raise ConfigError(
            "PROXYMQ_BROKER_URL",
            f"TLS options in the URL ({ssl_keys[0]!r}) are not supported; use amqps:// and "
            "PROXYMQ_BROKER_CA_FILE, PROXYMQ_BROKER_CERT_FILE, PROXYMQ_BROKER_KEY_FILE",
        )
    ca_file, cert_file, key_file = (read(env, name, str, None) for name in BROKER_TLS_VARIABLES)
    if urls[0].scheme != "amqps":
        for name, value in zip(BROKER_TLS_VARIABLES, (ca_file, cert_file, key_file), strict=True):
            if value is not None:
                raise ConfigError(
                    name, "is set, but PROXYMQ_BROKER_URL is not amqps://, so TLS would not be used"
                )
        return None
    if (cert_file is None) != (key_file is None):
        given, missing = "PROXYMQ_BROKER_CERT_FILE", "PROXYMQ_BROKER_KEY_FILE"
        if cert_file is None:
            given, missing = missing, given
        raise ConfigError(given, f"is set without {missing}; a client certificate needs both")
    # Imported here, not at the top: gunicorn's master imports this module before gevent
    # patches the workers, and ssl imported before the patch is not made cooperative.
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        _load_pem(
            "PROXYMQ_BROKER_CA_FILE",
            ca_file,
            "holds no PEM certificate",
            lambda: context.load_verify_locations(cafile=ca_file),
        )
    if cert_file is not None:
        _load_pem(
            "PROXYMQ_BROKER_CERT_FILE",
            cert_file,
            "holds no PEM certificate",
            lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cert_file),
        )
        _load_pem(
            "PROXYMQ_BROKER_KEY_FILE",
            key_file,
            "is not the unencrypted PEM private key of PROXYMQ_BROKER_CERT_FILE's certificate",
            lambda: context.load_cert_chain(cert_file, key_file, password=""),
        )
    nodes = tuple(BrokerNode(parts.hostname, parts.port or AMQPS_PORT) for parts in urls)
    return BrokerTLS(nodes, ca_file, cert_file, key_file)


def _load_pem(variable: str, path: str, wrong: str, load: Callable[[], None]) -> None:
    import ssl

    try:
        with open(path, "rb"):
            pass
        load()
    except ssl.SSLError:
        raise ConfigError(variable, f"{path!r} {wrong}") from None
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path!r}: {exc.strerror}") from None


def check_broker_certificate(tls: BrokerTLS, timeout: float = 5.0) -> None:
    """Stop at start-up, with one line naming the node, if a broker's certificate does
    not verify; every node of a list that answers is checked, each against its own host.

    A TLS handshake only (py-amqp's own transport and options, no credentials sent):
    a certificate that does not verify is a configuration mistake that retrying cannot
    fix, so the process must not come up and retry forever. A node that is down or
    unreachable is not: the process starts and connects when it can, as over plain AMQP
    (and a node checked later on, at failover, is refused by that connection's own check).
    """
    for node in tls.nodes:
        _check_node(tls, node, timeout)


def _check_node(tls: BrokerTLS, node: BrokerNode, timeout: float) -> None:
    import ssl

    from amqp.transport import Transport  # here: the rest of this module needs no AMQP

    transport = Transport(node.address, connect_timeout=timeout, ssl=tls.ssl_options(node.host))
    try:
        transport.connect()
    except ssl.SSLCertVerificationError as exc:
        raise _certificate_error(tls, node, exc) from None
    except OSError:
        return  # down, unreachable, or refusing us: the process's own reconnects report it
    transport.close()


def _certificate_error(
    tls: BrokerTLS, node: BrokerNode, exc: ssl.SSLCertVerificationError
) -> ConfigError:
    """The one line for ``node``'s certificate: which setting to fix, naming the node."""
    if exc.verify_code in _NAME_MISMATCH:
        return ConfigError(
            "PROXYMQ_BROKER_URL",
            f"the broker's certificate is not valid for host {node.host!r} "
            f"({exc.verify_message}); the URL must name a host the certificate lists",
        )
    if tls.ca_file is not None:
        return ConfigError(
            "PROXYMQ_BROKER_CA_FILE",
            f"the broker's certificate at {node.address} does not verify against "
            f"{tls.ca_file!r}: {exc.verify_message}",
        )
    return ConfigError(
        "PROXYMQ_BROKER_URL",
        f"the broker's certificate at {node.address} does not verify against the system's "
        f"CAs: {exc.verify_message}; PROXYMQ_BROKER_CA_FILE names a private CA",
    )


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
    body_timeout: float = 30.0
    reply_users: frozenset[str] | None = None
    broker_tls: BrokerTLS | None = None
    stream_idle_timeout: float = 30.0
    stream_buffer_bytes: int = 1024 * 1024
    idempotency_ttl: int = 86400
    max_client_priority: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GatewayConfig:
        d, url = cls(), broker_url(env)
        return cls(
            broker_url=url,
            bind=read(env, "PROXYMQ_GATEWAY_BIND", bind_address, d.bind),
            services=read(env, "PROXYMQ_SERVICES", _service_list, d.services),
            reply_timeout=read(env, "PROXYMQ_REPLY_TIMEOUT", positive_number, d.reply_timeout),
            max_body_bytes=read(env, "PROXYMQ_MAX_BODY_BYTES", positive_int, d.max_body_bytes),
            max_header_bytes=read(
                env, "PROXYMQ_MAX_HEADER_BYTES", positive_int, d.max_header_bytes
            ),
            result_url=read(env, "PROXYMQ_RESULT_URL", _redis_url, d.result_url),
            job_ttl=read(env, "PROXYMQ_JOB_TTL", positive_int, d.job_ttl),
            job_timeout=read(env, "PROXYMQ_JOB_TIMEOUT", positive_number, d.job_timeout),
            job_auth_header=read(env, "PROXYMQ_JOB_AUTH_HEADER", _header_name, d.job_auth_header),
            body_timeout=read(env, "PROXYMQ_BODY_TIMEOUT", positive_number, d.body_timeout),
            reply_users=read(env, "PROXYMQ_REPLY_USERS", _user_list, d.reply_users),
            broker_tls=broker_tls(env, url),
            stream_idle_timeout=read(
                env, "PROXYMQ_STREAM_IDLE_TIMEOUT", positive_number, d.stream_idle_timeout
            ),
            stream_buffer_bytes=read(
                env, "PROXYMQ_STREAM_BUFFER_BYTES", positive_int, d.stream_buffer_bytes
            ),
            idempotency_ttl=read(env, "PROXYMQ_IDEMPOTENCY_TTL", positive_int, d.idempotency_ttl),
            max_client_priority=read(
                env, "PROXYMQ_MAX_CLIENT_PRIORITY", _max_priority, d.max_client_priority
            ),
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
    max_priority: int | None = None

    @property
    def queue(self) -> str:
        return queue_name(self.name)


# Per-service keys: TOML key -> parser. The environment variable is PROXYMQ_<KEY upper>.
SERVICE_KEYS: dict[str, Callable[[str], Any]] = {
    "downstream_url": _http_url,
    "batch_url": _http_url,
    "batch_size": positive_int,
    "batch_wait_ms": positive_number,
    "downstream_timeout": positive_number,
    "queue_max_length": positive_int,
    "queue_type": _queue_type,
    "batch_concurrency": positive_int,
    "max_deliveries": positive_int,
    "health_url": _http_url,
    "max_priority": _max_priority,
}
assert set(SERVICE_KEYS) == {f.name for f in fields(ServiceConfig)} - {"name"}


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    broker_url: str = DEFAULT_BROKER_URL
    services: dict[str, ServiceConfig] = field(default_factory=dict)
    metrics_port: int = 8001
    result_url: str | None = None
    job_ttl: int = 3600
    callback_secret: str | None = None
    callback_allow_private: bool = False
    task_events: bool = True
    max_response_bytes: int = 10 * 1024 * 1024
    broker_tls: BrokerTLS | None = None
    stream_idle_timeout: float = 30.0
    cancel_users: frozenset[str] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], queues: list[str] | None = None) -> WorkerConfig:
        """Build the worker's configuration.

        ``queues`` are the queue names given with ``-Q``; the worker serves exactly those
        services. Without ``-Q`` it serves every service of the TOML file, or the one
        named by ``PROXYMQ_SERVICE``.
        """
        d, url = cls(), broker_url(env)
        return cls(
            broker_url=url,
            services=_services(env, queues),
            metrics_port=read(env, "PROXYMQ_WORKER_METRICS_PORT", _port, d.metrics_port),
            result_url=read(env, "PROXYMQ_RESULT_URL", _redis_url, d.result_url),
            job_ttl=read(env, "PROXYMQ_JOB_TTL", positive_int, d.job_ttl),
            callback_secret=read(env, "PROXYMQ_CALLBACK_SECRET", str, d.callback_secret),
            callback_allow_private=read(
                env, "PROXYMQ_CALLBACK_ALLOW_PRIVATE", boolean, d.callback_allow_private
            ),
            task_events=read(env, "PROXYMQ_TASK_EVENTS", boolean, d.task_events),
            max_response_bytes=read(
                env, "PROXYMQ_MAX_RESPONSE_BYTES", positive_int, d.max_response_bytes
            ),
            broker_tls=broker_tls(env, url),
            stream_idle_timeout=read(
                env, "PROXYMQ_STREAM_IDLE_TIMEOUT", positive_number, d.stream_idle_timeout
            ),
            cancel_users=read(env, "PROXYMQ_CANCEL_USERS", _user_list, d.cancel_users),
        )


def _services(env: Mapping[str, str], queues: list[str] | None) -> dict[str, ServiceConfig]:
    path = read(env, "PROXYMQ_CONFIG", str, None)
    file_services = _read_toml(path) if path is not None else {}
    env_service = read(env, "PROXYMQ_SERVICE", _service_name, None)
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
    """Combinations the broker would refuse when the worker declares the queue."""
    if service.max_priority is not None and service.queue_type == "quorum":
        # RabbitMQ before 4.0 refuses x-max-priority on a quorum queue (PRECONDITION_FAILED).
        raise ConfigError(
            "PROXYMQ_MAX_PRIORITY",
            f"service {service.name!r} has a quorum queue, which supports no priorities "
            "on RabbitMQ before 4.0; use a classic queue or unset it",
        )
    return service


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
        raise ConfigError(
            "PROXYMQ_CONFIG", f"{where} {key} {exc} (got {_shown(parse, value)})"
        ) from None

"""Parsing settings' values: one rule set for every process (gateway, workers, fetcher).

Every problem is a ``ConfigError`` whose text is one line naming the variable, so a
process with bad settings stops at once with a message an operator can act on, never
with a traceback or a silently substituted default. ``read`` takes a variable from the
environment; the parsers below turn its text into a value.

This module imports nothing but the standard library on purpose: ``gunicorn.conf.py``
parses the settings in the master before it forks, and importing Flask, requests or ssl
there would happen before gevent patches the workers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A setting is missing or malformed; ``str()`` is one line naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


def read(env: Mapping[str, str], name: str, parse: Callable[[str], Any], default: Any) -> Any:
    """The value of variable ``name``: ``default`` when unset, else ``parse`` of its text.

    The text is stripped first; set but blank is an error, because a blank left by a
    template (``VAR=``) is more likely a mistake than a request for the default. Every
    problem is a ``ConfigError`` of one line, ``NAME: problem (got '<raw value>')``;
    ``repr()`` keeps it one line even if the value holds a newline, and a URL is shown
    redacted (``shown_value``).
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
        raise ConfigError(name, f"{exc} (got {shown_value(parse, raw)})") from None


def shown_value(parse: Callable[[str], Any], raw: object) -> str:
    """How an error quotes the value ``raw`` that ``parse`` refused: a URL's secrets
    hidden (``redact_url``), in ``repr()`` to keep the message one line."""
    return repr(redact_url(str(raw)) if parse in _URL_PARSERS else raw)


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


def callback_retries(text: str) -> int:
    """Retries of a failed job callback: 0 (none) to 20."""
    return _integer_in(text, 0, 20, "an integer from 0 to 20")


def port(text: str) -> int:
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
http_url = _url(("http", "https"))
_one_broker_url = _url(("amqp", "amqps", "pyamqp"), path_holds_at=False)


def broker_url_list(text: str) -> str:
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


_URL_PARSERS.add(broker_url_list)


def broker_urls(url: str) -> list[str]:
    """The URLs of a valid ``PROXYMQ_BROKER_URL``, in the order given."""
    return url.split(";")


redis_url = _url(("redis", "rediss"), path_holds_at=False)


def bind_address(text: str) -> str:
    """Where a server listens: ``HOST:PORT``, the port plain digits (gunicorn's ``-b``)."""
    host, sep, number = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    port(number)
    return text


# -- service names ----------------------------------------------------------------------------
# A service is a path's first segment at the gateway and a queue's name at the broker: the
# same rule in the gateway's routing, the workers' -Q and every setting naming services.

SERVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESERVED_NAMES = frozenset({"healthz", "readyz", "metrics", "jobs"})
QUEUE_SUFFIX = "_requests"


def queue_name(service: str) -> str:
    return service + QUEUE_SUFFIX


def is_service_name(name: str) -> bool:
    return SERVICE_NAME.fullmatch(name) is not None and name not in RESERVED_NAMES


def service_name(text: str) -> str:
    if not is_service_name(text):
        raise ValueError("must match [A-Za-z0-9_-]{1,64} and not be a reserved name")
    return text


def service_list(text: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    bad = sorted(name for name in names if not is_service_name(name))
    if bad or not names:
        raise ValueError(f"must be a comma-separated list of service names, bad: {bad}")
    return names


def queue_type(text: str) -> str:
    if text not in ("classic", "quorum"):
        raise ValueError("must be 'classic' or 'quorum'")
    return text


def max_priority(text: str) -> int:
    """A queue's highest priority: RabbitMQ takes 1 to 255 (its docs advise at most 10)."""
    return _integer_in(text, 1, 255, "an integer from 1 to 255")


def user_list(text: str) -> frozenset[str]:
    """Broker user names: AMQP's ``user_id`` is a short string, compared exactly."""
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError("must be a comma-separated list of broker user names")
    return names


def header_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9-]+", text):
        raise ValueError("must be an HTTP header name")
    return text

"""The fetcher's settings: read from the environment once, validated, frozen.

This module imports nothing but the standard library on purpose: ``gunicorn.conf.py``
calls ``FetcherConfig.from_env`` in the master before it forks, and importing Flask,
requests or ssl there would happen before gevent patches the workers.

Every problem is a ``ConfigError`` whose ``str()`` is one line naming the variable, so a
process with bad settings stops with a message an operator can act on, never with a
traceback or a silently substituted default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_DIGITS = re.compile(r"[0-9]+")


class ConfigError(Exception):
    """A setting is malformed; ``str()`` is one line naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


def _positive_int(text: str) -> int:
    # A strict pattern rather than int(): int() also takes "1_000", "+5" and non-ASCII
    # digits, which are more likely typos than intent in an environment variable.
    if _DIGITS.fullmatch(text) and int(text) > 0:
        return int(text)
    raise ValueError("must be a positive integer")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isfinite(value) and value > 0:
        return value
    raise ValueError("must be a positive number of seconds")


def _boolean(text: str) -> bool:
    # Only the two words: "1", "yes" or "on" would be guesses, and guessing wrong on a
    # safety switch is worse than refusing to start.
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ValueError("must be true or false")


def _read(
    environ: Mapping[str, str], variable: str, parse: Callable[[str], Any], default: Any
) -> Any:
    """Parse one variable; unset or blank means the default (compose writes ``VAR=``)."""
    raw = environ.get(variable)
    if raw is None or not raw.strip():
        return default
    try:
        return parse(raw.strip())
    except ValueError as error:
        # repr() keeps the message on one line even if the value holds a newline.
        raise ConfigError(variable, f"{error}, got {raw!r}") from None


@dataclass(frozen=True)
class FetcherConfig:
    """Everything the fetcher reads from its environment.

    Unknown ``FETCHER_*`` variables are deliberately not rejected: Kubernetes injects
    ``FETCHER_SERVICE_HOST``, ``FETCHER_PORT`` … into every pod when a Service is named
    ``fetcher``, and ``gunicorn.conf.py`` reads ``FETCHER_BIND``.
    """

    batch_size: int = 10
    allow_private: bool = False
    max_bytes: int = 10 * 1024 * 1024
    timeout: float = 10.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FetcherConfig:
        """Build the config from ``environ``; raises ``ConfigError`` on the first bad value."""
        return cls(
            batch_size=_read(environ, "FETCHER_BATCH_SIZE", _positive_int, cls.batch_size),
            allow_private=_read(environ, "FETCHER_ALLOW_PRIVATE", _boolean, cls.allow_private),
            max_bytes=_read(environ, "FETCHER_MAX_BYTES", _positive_int, cls.max_bytes),
            timeout=_read(environ, "FETCHER_TIMEOUT", _positive_seconds, cls.timeout),
        )

"""The fetcher's settings: read from the environment once, validated, frozen.

The variables are parsed by ``proxymq.parsers``, so the fetcher, the gateway and
the workers follow one rule set (stripped values, blank is an error, plain digits,
``true``/``false`` only) and give errors of one shape: a ``ConfigError`` whose ``str()``
is one line, ``VARIABLE: problem (got '...')``.

This module and ``proxymq.parsers`` import nothing but the standard library on purpose:
``gunicorn.conf.py`` calls ``FetcherConfig.from_env`` in the master before it forks, and
importing Flask, requests or ssl there would happen before gevent patches the workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxymq.parsers import (
    ConfigError,
    bind_address,
    boolean,
    positive_int,
    positive_number,
    read,
)

# ConfigError is what from_env raises; callers (gunicorn.conf.py) import it from here.
__all__ = ["ConfigError", "FetcherConfig"]


@dataclass(frozen=True)
class FetcherConfig:
    """Everything the fetcher reads from its environment.

    ``bind`` is only read by ``gunicorn.conf.py`` (a ``-b`` on the command line wins over
    it). Unknown ``FETCHER_*`` variables are deliberately not rejected: Kubernetes injects
    ``FETCHER_SERVICE_HOST``, ``FETCHER_PORT`` … into every pod when a Service is named
    ``fetcher``.
    """

    batch_size: int = 10
    allow_private: bool = False
    max_bytes: int = 10 * 1024 * 1024
    timeout: float = 10.0
    bind: str = "0.0.0.0:8080"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FetcherConfig:
        """Build the config from ``environ``; raises ``ConfigError`` on the first bad value."""
        d = cls()
        return cls(
            batch_size=read(environ, "FETCHER_BATCH_SIZE", positive_int, d.batch_size),
            allow_private=read(environ, "FETCHER_ALLOW_PRIVATE", boolean, d.allow_private),
            max_bytes=read(environ, "FETCHER_MAX_BYTES", positive_int, d.max_bytes),
            timeout=read(environ, "FETCHER_TIMEOUT", positive_number, d.timeout),
            bind=read(environ, "FETCHER_BIND", bind_address, d.bind),
        )

"""FetcherConfig: defaults, parsing, and one-line errors that name the variable.

The parsing rules themselves are ``proxymq.config``'s; ``tests/unit/test_config.py``
checks that the fetcher, the gateway and the workers agree on them.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fetcher.config import ConfigError, FetcherConfig

REPO = Path(__file__).resolve().parents[2]
VARIABLES = [
    "FETCHER_BATCH_SIZE",
    "FETCHER_ALLOW_PRIVATE",
    "FETCHER_MAX_BYTES",
    "FETCHER_TIMEOUT",
    "FETCHER_BIND",
]


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter from the repo root, without FETCHER_* settings."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("FETCHER_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_defaults_when_nothing_is_set() -> None:
    config = FetcherConfig.from_env({})
    assert config == FetcherConfig(
        batch_size=10, allow_private=False, max_bytes=10_485_760, timeout=10.0, bind="0.0.0.0:8080"
    )


def test_values_are_parsed() -> None:
    config = FetcherConfig.from_env(
        {
            "FETCHER_BATCH_SIZE": "25",
            "FETCHER_ALLOW_PRIVATE": "true",
            "FETCHER_MAX_BYTES": " 1000 ",
            "FETCHER_TIMEOUT": "2.5",
            "FETCHER_BIND": "127.0.0.1:9000",
        }
    )
    assert config == FetcherConfig(
        batch_size=25, allow_private=True, max_bytes=1000, timeout=2.5, bind="127.0.0.1:9000"
    )


def test_allow_private_false_is_accepted() -> None:
    assert FetcherConfig.from_env({"FETCHER_ALLOW_PRIVATE": "false"}).allow_private is False


@pytest.mark.parametrize("variable", VARIABLES)
@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_a_blank_value_is_an_error_not_the_default(variable: str, blank: str) -> None:
    with pytest.raises(ConfigError) as caught:
        FetcherConfig.from_env({variable: blank})
    assert str(caught.value) == (
        f"{variable}: is set but blank; unset it to mean the default (got {blank!r})"
    )


def test_other_fetcher_variables_are_ignored() -> None:
    # Kubernetes service links share the prefix.
    environ = {"FETCHER_PORT": "tcp://10.0.0.7:8080", "FETCHER_SERVICE_HOST": "10.0.0.7"}
    assert FetcherConfig.from_env(environ) == FetcherConfig()


def test_error_message_is_exactly_one_line_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        FetcherConfig.from_env({"FETCHER_BATCH_SIZE": "abc"})
    assert str(caught.value) == "FETCHER_BATCH_SIZE: must be a positive integer (got 'abc')"
    assert caught.value.variable == "FETCHER_BATCH_SIZE"


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("FETCHER_BATCH_SIZE", "0", "must be a positive integer"),
        ("FETCHER_BATCH_SIZE", "-3", "must be a positive integer"),
        ("FETCHER_BATCH_SIZE", "1.5", "must be a positive integer"),
        ("FETCHER_BATCH_SIZE", "1_000", "must be a positive integer"),
        ("FETCHER_BATCH_SIZE", "+5", "must be a positive integer"),
        ("FETCHER_MAX_BYTES", "10MB", "must be a positive integer"),
        ("FETCHER_MAX_BYTES", "0", "must be a positive integer"),
        ("FETCHER_TIMEOUT", "0", "must be a positive number"),
        ("FETCHER_TIMEOUT", "-1", "must be a positive number"),
        ("FETCHER_TIMEOUT", "nan", "must be a positive number"),
        ("FETCHER_TIMEOUT", "inf", "must be a positive number"),
        ("FETCHER_TIMEOUT", "ten", "must be a positive number"),
        ("FETCHER_TIMEOUT", "1e3", "must be a positive number"),
        ("FETCHER_ALLOW_PRIVATE", "yes", "must be 'true' or 'false', lower case"),
        ("FETCHER_ALLOW_PRIVATE", "1", "must be 'true' or 'false', lower case"),
        ("FETCHER_ALLOW_PRIVATE", "TRUE", "must be 'true' or 'false', lower case"),
        ("FETCHER_BIND", "8080", "must be HOST:PORT"),
        ("FETCHER_BIND", "0.0.0.0:+80", "must be a port number between 1 and 65535"),
    ],
)
def test_bad_values_are_refused(variable: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        FetcherConfig.from_env({variable: value})
    assert str(caught.value) == f"{variable}: {problem} (got {value!r})"


def test_a_value_with_a_newline_still_gives_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        FetcherConfig.from_env({"FETCHER_MAX_BYTES": "12\nrm -rf"})
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("FETCHER_MAX_BYTES: ")


def test_config_is_frozen() -> None:
    config = FetcherConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 3  # type: ignore[misc]


def test_importing_the_config_loads_neither_flask_nor_the_app() -> None:
    # gunicorn.conf.py imports fetcher.config in the master, before gevent patches workers.
    probe = (
        "import sys, fetcher.config\n"
        "loaded = {'flask', 'werkzeug', 'requests', 'urllib3', 'ssl', 'fetcher.web',\n"
        "          'proxymq.outbound'}\n"
        "print(sorted(loaded & set(sys.modules)))\n"
    )
    result = _run_python(probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_app_is_created_on_first_access() -> None:
    probe = (
        "import fetcher, flask\n"
        "app = fetcher.app\n"
        "from fetcher import app as again\n"
        "assert isinstance(app, flask.Flask) and again is app\n"
        "print(sorted(rule.rule for rule in app.url_map.iter_rules()))\n"
    )
    result = _run_python(probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['/batch', '/fetch', '/healthz']"

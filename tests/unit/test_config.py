"""proxymq.config: defaults, the worker's services, and one parsing rule for all processes."""

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from fetcher.config import FetcherConfig
from proxymq.config import GatewayConfig, WorkerConfig
from proxymq.parsers import ConfigError, redact_url

WORKER_ENV = {"PROXYMQ_SERVICE": "a", "PROXYMQ_DOWNSTREAM_URL": "http://a"}


def test_gateway_defaults_match_the_spec():
    config = GatewayConfig.from_env({})
    assert config.broker_url == "amqp://guest:guest@localhost:5672//"
    assert config.bind == "0.0.0.0:8000"
    assert config.services is None
    assert (config.reply_timeout, config.max_body_bytes, config.max_header_bytes) == (
        120.0,
        10485760,
        32768,
    )
    assert config.job_auth_header == "Authorization"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROXYMQ_BROKER_URL", "http://localhost"),
        ("PROXYMQ_BROKER_URL", "amqp://"),
        ("PROXYMQ_GATEWAY_BIND", "8000"),
        ("PROXYMQ_REPLY_TIMEOUT", "-1"),
        ("PROXYMQ_REPLY_TIMEOUT", "nan"),
        ("PROXYMQ_MAX_BODY_BYTES", "10MB"),
        ("PROXYMQ_MAX_HEADER_BYTES", "0"),
        ("PROXYMQ_SERVICES", "ok,not.ok"),
        ("PROXYMQ_SERVICES", "healthz"),
        ("PROXYMQ_RESULT_URL", "localhost:6379"),
    ],
)
def test_bad_gateway_setting_names_the_variable_in_one_line(variable, value):
    with pytest.raises(ConfigError) as caught:
        GatewayConfig.from_env({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message
    assert repr(redact_url(value) if variable.endswith("_URL") else value) in message


def test_services_allow_list_is_parsed():
    config = GatewayConfig.from_env({"PROXYMQ_SERVICES": "a, b_c ,d-e"})
    assert config.services == {"a", "b_c", "d-e"}


def test_worker_serves_the_service_named_by_its_queue():
    env = {"PROXYMQ_DOWNSTREAM_URL": "http://svc:8080"}
    config = WorkerConfig.from_env(env, ["url_fetcher_requests"])
    assert list(config.services) == ["url_fetcher"]
    service = config.services["url_fetcher"]
    assert service.downstream_url == "http://svc:8080"
    assert (service.batch_size, service.batch_wait_ms, service.max_deliveries) == (10, 20.0, 3)
    assert service.queue == "url_fetcher_requests"


def test_worker_without_queues_or_service_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^PROXYMQ_SERVICE: "):
        WorkerConfig.from_env({"PROXYMQ_DOWNSTREAM_URL": "http://svc"}, None)


def test_worker_needs_a_downstream_url():
    with pytest.raises(ConfigError, match=r"^PROXYMQ_DOWNSTREAM_URL: "):
        WorkerConfig.from_env({"PROXYMQ_SERVICE": "svc"}, None)


def test_queue_not_named_like_a_service_queue_is_refused():
    with pytest.raises(ConfigError, match=r"^-Q: "):
        WorkerConfig.from_env({"PROXYMQ_DOWNSTREAM_URL": "http://svc"}, ["celery"])


def test_toml_file_configures_services_and_env_overrides_it(tmp_path):
    path = tmp_path / "proxymq.toml"
    path.write_text(
        """
[services.alpha]
downstream_url = "http://alpha:8080"
batch_url = "http://alpha:8080/batch"
batch_size = 16

[services.beta]
downstream_url = "http://beta:8080"
queue_type = "quorum"
"""
    )
    config = WorkerConfig.from_env({"PROXYMQ_CONFIG": str(path)}, None)
    assert sorted(config.services) == ["alpha", "beta"]
    assert config.services["alpha"].batch_size == 16
    assert config.services["beta"].queue_type == "quorum"
    env = {"PROXYMQ_CONFIG": str(path), "PROXYMQ_BATCH_SIZE": "4"}
    only_beta = WorkerConfig.from_env(env, ["beta_requests"])
    assert list(only_beta.services) == ["beta"]
    assert only_beta.services["beta"].batch_size == 4


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("[services.a]\ndownstream_url = 'http://a'\ncolour = 'blue'\n", "unknown key 'colour'"),
        ("[services.a]\ndownstream_url = 'ftp://a'\n", "downstream_url must be"),
        ("[services.a]\ndownstream_url = 'http://a'\nbatch_size = -2\n", "batch_size must be"),
        ("broker = 'x'\n", "unknown key 'broker'"),
        ("[services\n", "not valid TOML"),
    ],
)
def test_bad_toml_file_is_one_line_naming_proxymq_config(tmp_path, document, problem):
    path = tmp_path / "bad.toml"
    path.write_text(document)
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env({"PROXYMQ_CONFIG": str(path)}, None)
    assert str(caught.value).startswith("PROXYMQ_CONFIG: ")
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_toml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^PROXYMQ_CONFIG: cannot read"):
        WorkerConfig.from_env({"PROXYMQ_CONFIG": str(tmp_path / "nope.toml")}, None)


def test_service_queue_arguments_follow_the_service_settings():
    from proxymq.config import ServiceConfig
    from workers.app import service_queue

    plain = service_queue(ServiceConfig("a", "http://a"))
    assert (plain.name, plain.durable, plain.queue_arguments) == ("a_requests", True, {})
    limited = service_queue(ServiceConfig("b", "http://b", queue_max_length=5, queue_type="quorum"))
    assert limited.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 4,
        "x-max-length": 5,
        "x-overflow": "reject-publish",
    }


def test_task_events_switch_takes_only_true_or_false():
    env = {"PROXYMQ_DOWNSTREAM_URL": "http://a", "PROXYMQ_SERVICE": "a"}
    assert WorkerConfig.from_env(env).task_events is True
    assert WorkerConfig.from_env({**env, "PROXYMQ_TASK_EVENTS": "false"}).task_events is False
    with pytest.raises(ConfigError, match=r"^PROXYMQ_TASK_EVENTS: must be 'true' or 'false'"):
        WorkerConfig.from_env({**env, "PROXYMQ_TASK_EVENTS": "no"})


def test_worker_defaults_are_the_dataclass_defaults():
    config = WorkerConfig.from_env(WORKER_ENV)
    assert config == WorkerConfig(services=config.services)
    assert (config.metrics_port, config.job_ttl, config.task_events) == (8001, 3600, True)


# -- one rule set: the gateway, the worker and the fetcher read a raw value alike -----------
#
# Each table maps a variable to how its process reads it; every process is fed the same raw
# text and must give the same answer: the same value, or a refusal. The gateway has no
# true/false setting, so the switch table holds the worker's and the fetcher's only.

Reader = Callable[[Mapping[str, str]], Any]
REFUSED = "refused"


def _worker(env: Mapping[str, str]) -> WorkerConfig:
    return WorkerConfig.from_env({**WORKER_ENV, **env})


INTEGERS: dict[str, Reader] = {
    "PROXYMQ_MAX_BODY_BYTES": lambda env: GatewayConfig.from_env(env).max_body_bytes,
    "PROXYMQ_BATCH_SIZE": lambda env: _worker(env).services["a"].batch_size,
    "PROXYMQ_JOB_TTL": lambda env: _worker(env).job_ttl,
    "FETCHER_BATCH_SIZE": lambda env: FetcherConfig.from_env(env).batch_size,
}
NUMBERS: dict[str, Reader] = {
    "PROXYMQ_REPLY_TIMEOUT": lambda env: GatewayConfig.from_env(env).reply_timeout,
    "PROXYMQ_DOWNSTREAM_TIMEOUT": lambda env: _worker(env).services["a"].downstream_timeout,
    "FETCHER_TIMEOUT": lambda env: FetcherConfig.from_env(env).timeout,
}
SWITCHES: dict[str, Reader] = {
    "PROXYMQ_TASK_EVENTS": lambda env: _worker(env).task_events,
    "PROXYMQ_CALLBACK_ALLOW_PRIVATE": lambda env: _worker(env).callback_allow_private,
    "FETCHER_ALLOW_PRIVATE": lambda env: FetcherConfig.from_env(env).allow_private,
}
# Values every kind refuses: blank (set but empty is never the default) and near misses.
REFUSED_BY_ALL = ["", " ", "\t\n", "True", "nan", "inf", "+5", "-1", "1_000", "0x10", "5 5"]


def _answers(readers: dict[str, Reader], raw: str) -> dict[str, Any]:
    """What each process makes of ``raw``: the value read, or REFUSED."""
    answers = {}
    for variable, read_value in readers.items():
        try:
            answers[variable] = read_value({variable: raw})
        except ConfigError as error:
            message = str(error)
            assert message.startswith(f"{variable}: ") and message.endswith(f"(got {raw!r})")
            assert "\n" not in message
            answers[variable] = REFUSED
    return answers


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("5", 5),
        (" 5 ", 5),
        ("\t7\n", 7),
        ("007", 7),
        ("0", REFUSED),
        ("1.0", REFUSED),
        ("1e3", REFUSED),
        ("\u0665", REFUSED),  # ARABIC-INDIC DIGIT FIVE: int() takes it
        ("\uff15", REFUSED),  # FULLWIDTH DIGIT FIVE: int() takes it
        *[(raw, REFUSED) for raw in REFUSED_BY_ALL],
    ],
)
def test_every_process_reads_an_integer_the_same_way(raw, expected):
    assert _answers(INTEGERS, raw) == dict.fromkeys(INTEGERS, expected)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2", 2.0),
        ("1.5", 1.5),
        (" 1.5 ", 1.5),
        ("0.001", 0.001),
        ("0", REFUSED),
        ("0.0001", REFUSED),
        (".5", REFUSED),
        ("1.", REFUSED),
        ("1e3", REFUSED),
        ("1_0", REFUSED),
        ("-inf", REFUSED),
        ("\u0661.\u0665", REFUSED),  # Arabic-Indic 1.5: float() takes it
        *[(raw, REFUSED) for raw in REFUSED_BY_ALL],
    ],
)
def test_every_process_reads_a_number_the_same_way(raw, expected):
    assert _answers(NUMBERS, raw) == dict.fromkeys(NUMBERS, expected)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("false", False),
        (" true ", True),
        ("TRUE", REFUSED),
        ("False", REFUSED),
        ("1", REFUSED),
        ("yes", REFUSED),
        ("on", REFUSED),
        *[(raw, REFUSED) for raw in REFUSED_BY_ALL],
    ],
)
def test_every_process_reads_a_switch_the_same_way(raw, expected):
    assert _answers(SWITCHES, raw) == dict.fromkeys(SWITCHES, expected)


@pytest.mark.parametrize(
    ("readers", "problem"),
    [
        (INTEGERS, "must be a positive integer"),
        (NUMBERS, "must be a positive number"),
        (SWITCHES, "must be 'true' or 'false', lower case"),
    ],
    ids=["integer", "number", "switch"],
)
def test_every_process_words_a_refusal_the_same_way(readers, problem):
    for variable, read_value in readers.items():
        with pytest.raises(ConfigError) as caught:
            read_value({variable: "True"})
        assert str(caught.value) == f"{variable}: {problem} (got 'True')"
        with pytest.raises(ConfigError) as caught:
            read_value({variable: " "})
        assert str(caught.value) == (
            f"{variable}: is set but blank; unset it to mean the default (got ' ')"
        )


TEXTS: dict[str, Reader] = {
    "PROXYMQ_BROKER_URL": GatewayConfig.from_env,
    "PROXYMQ_GATEWAY_BIND": GatewayConfig.from_env,
    "PROXYMQ_SERVICES": GatewayConfig.from_env,
    "PROXYMQ_CONFIG": _worker,
    "PROXYMQ_CALLBACK_SECRET": _worker,
    "PROXYMQ_DOWNSTREAM_URL": _worker,
    "FETCHER_BIND": FetcherConfig.from_env,
}


@pytest.mark.parametrize("variable", TEXTS)
def test_a_blank_text_setting_is_an_error_too(variable):
    with pytest.raises(ConfigError, match=rf"^{variable}: is set but blank"):
        TEXTS[variable]({variable: " "})


# -- a ';' list of broker URLs (a cluster's nodes) ----------------------------------------


def test_broker_url_list_is_kept_in_order_each_url_stripped():
    env = {"PROXYMQ_BROKER_URL": " amqp://u:p@a:5672// ; amqp://u:p@b:5673//;amqp://u:p@c// "}
    assert GatewayConfig.from_env(env).broker_url == (
        "amqp://u:p@a:5672//;amqp://u:p@b:5673//;amqp://u:p@c//"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("amqp://a//;", "URL 2 of the ';'-separated list is blank"),
        ("amqp://a//;http://b//", "URL 2 of the ';'-separated list must be a amqp/amqps/pyamqp"),
        ("amqp://a//;amqp://b:99999//", "URL 2 of the ';'-separated list must have a valid port"),
        ("amqp://a//;amqps://b//", "mixes amqps:// and plain AMQP URLs"),
    ],
)
def test_bad_broker_url_lists_are_one_line(value, message):
    with pytest.raises(ConfigError) as error:
        GatewayConfig.from_env({"PROXYMQ_BROKER_URL": value})
    assert str(error.value).startswith(f"PROXYMQ_BROKER_URL: {message}")
    assert "\n" not in str(error.value)


# -- URLs are quoted without their secrets ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@localhost:5672//", "amqp://***@localhost:5672//"),
        ("amqp://localhost//", "amqp://localhost//"),
        ("redis://:pw@redis:6379/0?ssl_cert_reqs=none", "redis://***@redis:6379/0?***"),
        ("http://svc/health#pw", "http://svc/health#***"),
        # urlsplit reads "gateway:pa" as host and port; the user info ends at the last '@'
        ("amqp://gateway:pa/ss@rabbit//", "amqp://***@rabbit//"),
        ("amqp://gateway:pa#ss@rabbit//", "amqp://***@rabbit//"),
        ("amqp://gateway:p@ss@[::1]:5672//", "amqp://***@[::1]:5672//"),
        # a part that is not scheme://… or not host[:port] could be a password itself
        ("gateway:pass@rabbit", "***"),
        ("amqp://gateway:pa;ss@rabbit//", "amqp://***;***"),
        (" amqp://u:p@a// ; amqp://u:p@b:5673// ", "amqp://***@a//;amqp://***@b:5673//"),
    ],
)
def test_redact_url_hides_user_info_query_and_what_is_not_a_host(url, shown):
    assert redact_url(url) == shown


PASSWORD = "Wq7zK9xPv2jM"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROXYMQ_BROKER_URL", "amqp://gateway:Wq7z/K9xPv2jM@rabbit//"),
        ("PROXYMQ_BROKER_URL", "amqp://gateway:1234/Wq7zK9xPv2jM@rabbit//"),
        ("PROXYMQ_BROKER_URL", "amqp://a//;amqp://gateway:Wq7zK9xPv2jM@b:99999//"),
        ("PROXYMQ_RESULT_URL", "redis://:Wq7z?K9xPv2jM@redis/0"),
        ("PROXYMQ_DOWNSTREAM_URL", "http://svc:Wq7z#K9xPv2jM@downstream/"),
        ("PROXYMQ_HEALTH_URL", "http://downstream:8o/health?token=Wq7zK9xPv2jM"),
    ],
)
def test_a_refused_url_setting_never_quotes_its_password(variable, value):
    with pytest.raises(ConfigError) as caught:
        _worker({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert not [
        PASSWORD[i : i + 4] for i in range(len(PASSWORD) - 3) if PASSWORD[i : i + 4] in message
    ]


def test_a_password_misread_as_a_port_is_explained():
    with pytest.raises(ConfigError) as caught:
        GatewayConfig.from_env({"PROXYMQ_BROKER_URL": "amqp://gateway:pa/ss@rabbit//"})
    assert str(caught.value) == (
        "PROXYMQ_BROKER_URL: must have a valid port; a '/', '?' or '#' in its user name or "
        "password must be percent-encoded (%2F, %3F, %23) (got 'amqp://***@rabbit//')"
    )


def test_an_at_sign_in_an_http_path_is_a_path():
    env = {"PROXYMQ_DOWNSTREAM_URL": "http://svc/users/a@b"}
    assert _worker(env).services["a"].downstream_url == "http://svc/users/a@b"


def test_a_url_in_the_toml_file_is_quoted_without_its_password(tmp_path):
    path = tmp_path / "services.toml"
    path.write_text('[services.a]\ndownstream_url = "http://svc:Wq7z/K9xPv2jM@downstream/"\n')
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env({"PROXYMQ_CONFIG": str(path)}, None)
    assert str(caught.value).startswith("PROXYMQ_CONFIG: [services.a] downstream_url must")
    assert "'http://***@downstream/'" in str(caught.value)
    assert "K9xP" not in str(caught.value)

import pytest

from proxymq.config import ConfigError, GatewayConfig, WorkerConfig


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
    assert repr(value) in message


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

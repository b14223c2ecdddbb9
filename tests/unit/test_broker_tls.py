"""proxymq.config's TLS settings: what py-amqp is given, and which settings are refused."""

import shutil
import ssl
import tempfile
from pathlib import Path

import pytest
from stack import make_pki

from proxymq.config import ConfigError, GatewayConfig, WorkerConfig, broker_tls


@pytest.fixture(scope="module")
def pki():
    directory = Path(tempfile.mkdtemp(prefix="proxymq-pki-"))
    yield make_pki(directory)
    shutil.rmtree(directory)


def test_amqps_options_check_the_url_host_name_even_for_localhost():
    # Kombu connects to 127.0.0.1 for "localhost"; the name checked stays the URL's.
    tls = broker_tls({}, "amqps://u:p@localhost//")
    assert tls.ssl_options() == {"server_hostname": "localhost", "cert_reqs": ssl.CERT_REQUIRED}
    assert tls.address == "localhost:5671"


def test_private_ca_and_client_certificate_reach_the_options(pki):
    cert, key = pki.client
    env = {
        "PROXYMQ_BROKER_URL": "amqps://u:p@[::1]:5999//",
        "PROXYMQ_BROKER_CA_FILE": str(pki.ca),
        "PROXYMQ_BROKER_CERT_FILE": str(cert),
        "PROXYMQ_BROKER_KEY_FILE": str(key),
    }
    worker_env = {**env, "PROXYMQ_SERVICE": "a", "PROXYMQ_DOWNSTREAM_URL": "http://a"}
    for config in (GatewayConfig.from_env(env), WorkerConfig.from_env(worker_env)):
        assert config.broker_tls.ssl_options() == {
            "server_hostname": "::1",
            "cert_reqs": ssl.CERT_REQUIRED,
            "ca_certs": str(pki.ca),
            "certfile": str(cert),
            "keyfile": str(key),
        }
        assert config.broker_tls.address == "[::1]:5999"


def test_plain_amqp_has_no_tls_settings():
    assert GatewayConfig.from_env({}).broker_tls is None
    env = {"PROXYMQ_SERVICE": "a", "PROXYMQ_DOWNSTREAM_URL": "http://a"}
    assert WorkerConfig.from_env(env).broker_tls is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PROXYMQ_BROKER_KEY_FILE": "{key}"},
            "PROXYMQ_BROKER_KEY_FILE: is set without PROXYMQ_BROKER_CERT_FILE",
        ),
        (
            {"PROXYMQ_BROKER_CERT_FILE": "{ca}", "PROXYMQ_BROKER_KEY_FILE": "{key}"},
            "PROXYMQ_BROKER_KEY_FILE: '{key}' is not the unencrypted PEM private key",
        ),
        (
            {"PROXYMQ_BROKER_CERT_FILE": "{key}", "PROXYMQ_BROKER_KEY_FILE": "{key}"},
            "PROXYMQ_BROKER_CERT_FILE: '{key}' holds no PEM certificate",
        ),
        (
            {"PROXYMQ_BROKER_CA_FILE": "/"},
            "PROXYMQ_BROKER_CA_FILE: cannot read '/': Is a directory",
        ),
        ({"PROXYMQ_BROKER_CA_FILE": " "}, "PROXYMQ_BROKER_CA_FILE: is set but blank"),
        (
            {"PROXYMQ_BROKER_URL": "amqps://u:p@a//;amqps://u:p@b//"},
            "PROXYMQ_BROKER_URL: several ';'-separated URLs are not supported with amqps://",
        ),
        (
            {"PROXYMQ_BROKER_URL": "amqps://u:p@a//?ssl=1"},
            "PROXYMQ_BROKER_URL: TLS options in the URL ('ssl') are not supported",
        ),
        (
            {"PROXYMQ_BROKER_URL": "pyamqp://u:p@a//", "PROXYMQ_BROKER_KEY_FILE": "{key}"},
            "PROXYMQ_BROKER_KEY_FILE: is set, but PROXYMQ_BROKER_URL is not amqps://",
        ),
    ],
)
def test_bad_tls_settings_are_one_line_naming_the_variable(pki, env, message):
    files = {"ca": pki.ca, "key": pki.client[1]}
    env = {name: value.format(**files) for name, value in env.items()}
    env.setdefault("PROXYMQ_BROKER_URL", "amqps://u:p@localhost//")
    with pytest.raises(ConfigError) as error:
        GatewayConfig.from_env(env)
    assert str(error.value).startswith(message.format(**files))
    assert "\n" not in str(error.value)

"""proxymq.config's TLS settings: what py-amqp is given, and which settings are refused."""

import shutil
import ssl
import tempfile
from pathlib import Path

import pytest
from celery import Celery
from support import make_pki

from proxymq.broker_tls import BrokerNode, broker_tls
from proxymq.config import GatewayConfig, WorkerConfig
from proxymq.parsers import ConfigError
from workers.failover import AMQP as NodeNamingAMQP
from workers.failover import NodeNamingConnection


@pytest.fixture(scope="module")
def pki():
    directory = Path(tempfile.mkdtemp(prefix="proxymq-pki-"))
    yield make_pki(directory)
    shutil.rmtree(directory)


def test_amqps_options_check_the_url_host_name_even_for_localhost():
    # Kombu connects to 127.0.0.1 for "localhost"; the name checked stays the URL's.
    tls = broker_tls({}, "amqps://u:p@localhost//")
    assert tls.nodes == (BrokerNode("localhost", 5671),)
    assert tls.ssl_options("localhost") == {
        "server_hostname": "localhost",
        "cert_reqs": ssl.CERT_REQUIRED,
    }
    assert tls.nodes[0].address == "localhost:5671"


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
        assert config.broker_tls.ssl_options("::1") == {
            "server_hostname": "::1",
            "cert_reqs": ssl.CERT_REQUIRED,
            "ca_certs": str(pki.ca),
            "certfile": str(cert),
            "keyfile": str(key),
        }
        assert config.broker_tls.nodes[0].address == "[::1]:5999"


def test_each_node_of_an_amqps_list_gets_options_naming_its_own_host(pki):
    url = "amqps://u:p@a.example:5999//;amqps://u:p@[::1]//; amqps://u:p@localhost:5998/v"
    tls = broker_tls({"PROXYMQ_BROKER_CA_FILE": str(pki.ca)}, url)
    assert tls.nodes == (
        BrokerNode("a.example", 5999),
        BrokerNode("::1", 5671),
        BrokerNode("localhost", 5998),
    )
    assert [node.address for node in tls.nodes] == [
        "a.example:5999",
        "[::1]:5671",
        "localhost:5998",
    ]
    first, second = (tls.ssl_options(node.host) for node in tls.nodes[:2])
    assert first == {**second, "server_hostname": "a.example"}
    assert second == {
        "server_hostname": "::1",
        "cert_reqs": ssl.CERT_REQUIRED,
        "ca_certs": str(pki.ca),
    }
    assert tls.ssl_options("::1") is not second  # never one dict shared by two connections


def test_a_list_mixing_amqps_and_plain_amqp_is_refused_with_one_line():
    for url in ("amqps://u:p@a//;amqp://u:p@b//", "amqp://u:p@a//;amqps://u:p@b//"):
        with pytest.raises(ConfigError) as error:
            GatewayConfig.from_env({"PROXYMQ_BROKER_URL": url})
        assert str(error.value).startswith(
            "PROXYMQ_BROKER_URL: mixes amqps:// and plain AMQP URLs in its ';'-separated list"
        )
        assert "\n" not in str(error.value)


def _celery_app(url: str) -> Celery:
    """A Celery app set up as workers.app sets up its own, for another broker URL."""
    tls = broker_tls({}, url)
    app = Celery("failover-test", broker=url, amqp=NodeNamingAMQP, set_as_current=False)
    app.conf.broker_use_ssl = tls.ssl_options(tls.nodes[0].host)
    return app


def test_celery_connections_name_the_node_they_fail_over_to():
    """Kombu's switch() alone would keep the first node's name; nothing connects here."""
    app = _celery_app("amqps://u:p@localhost:1//;amqps://u:p@127.0.0.2:2//;amqps://u:p@[::1]:3//")
    shared = dict(app.conf.broker_use_ssl)
    connection = app.connection_for_read()
    names = [connection.ssl["server_hostname"]]
    for _ in range(3):
        connection.maybe_switch_next()
        names.append(connection.ssl["server_hostname"])
    assert names == ["localhost", "127.0.0.2", "::1", "localhost"]
    assert app.conf.broker_use_ssl == shared  # the app's dict is never written to
    clone = connection.clone()
    clone.maybe_switch_next()
    assert clone.ssl["server_hostname"] == "127.0.0.2"


def test_every_connection_celery_and_flower_make_is_node_naming():
    app = _celery_app("amqps://u:p@a//;amqps://u:p@b//")
    with app.pool.acquire() as pooled, app.producer_pool.acquire() as producer:
        made = [
            app.connection_for_read(),
            app.connection_for_write(),
            app.connection(),  # Flower's events and dashboards
            pooled,
            producer.connection,
        ]
    assert all(isinstance(connection, NodeNamingConnection) for connection in made)
    for connection in made:
        connection.maybe_switch_next()
        assert connection.ssl["server_hostname"] == "b"


def test_workers_app_uses_the_node_naming_connections():
    from workers.app import app

    assert isinstance(app.connection_for_read(), NodeNamingConnection)


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

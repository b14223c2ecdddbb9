"""The settings the gateway and the workers share: declared once, and the broker's part
(URL and TLS, whose files are read and checked) read once per process."""

import importlib
from dataclasses import fields
from types import SimpleNamespace

import pytest
from support import free_port

import proxymq.config
from proxymq.config import BrokerLink, GatewayConfig, SharedConfig, WorkerConfig

WORKER_ENV = {"PROXYMQ_SERVICE": "a", "PROXYMQ_DOWNSTREAM_URL": "http://a"}


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def test_the_fields_both_processes_read_are_declared_once():
    # ``services`` is two settings under one name: the gateway's allow-list of names
    # (PROXYMQ_SERVICES), the services a worker serves (-Q, PROXYMQ_SERVICE, the TOML file).
    both = _names(GatewayConfig) & _names(WorkerConfig) - {"services"}
    assert both == _names(SharedConfig)
    for config in (GatewayConfig, WorkerConfig):
        assert not set(config.__annotations__) & _names(SharedConfig), config


@pytest.mark.parametrize(
    "read",
    [GatewayConfig.from_env, lambda env, broker: WorkerConfig.from_env(env, broker=broker)],
    ids=["gateway", "worker"],
)
def test_a_broker_part_handed_on_is_not_read_again(read):
    # Read, these would be refused; handed a broker part, from_env does not look at them.
    env = {**WORKER_ENV, "PROXYMQ_BROKER_URL": "not a url", "PROXYMQ_BROKER_CA_FILE": "/none"}
    config = read(env, BrokerLink("amqp://u:p@elsewhere//"))
    assert (config.broker_url, config.broker_tls) == ("amqp://u:p@elsewhere//", None)


def test_a_worker_reads_its_broker_settings_once(monkeypatch):
    """``workers.app`` reads the broker's part at import (every celery command needs it);
    the worker's start-up (``celeryd_init``) must not read it, nor its TLS files, again."""
    worker_app = importlib.import_module("workers.app")  # ``workers.app`` is the Celery app

    reads = []
    real = proxymq.config.broker_tls
    monkeypatch.setattr(proxymq.config, "broker_tls", lambda *a: reads.append(a) or real(*a))
    for name, value in {**WORKER_ENV, "PROXYMQ_WORKER_METRICS_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    instance = SimpleNamespace(hostname="w@host")
    conf = SimpleNamespace(worker_pool="threads", worker_concurrency=2)
    worker_app._configure(instance=instance, conf=conf, options={"queues": "a_requests"})
    assert list(instance.proxymq.config.services) == ["a"]
    assert instance.proxymq.config.broker_url == worker_app._BROKER.url
    assert reads == []

"""The broker users of deploy/helm/proxymq/files/rabbitmq-start.sh (used by compose.yml and
the chart's bundled broker): one per role, each with the least it needs.

RabbitMQ checks configure (declare/delete), write (publish; the queue side of a bind) and
read (consume, get, purge; the exchange side of a bind) against a regex per user and vhost;
the default exchange is ``amq.default``; a passive declare needs no permission. These
tests match resource names the way the broker does, and the permission sets were checked
against a running RabbitMQ with the real gateway, worker and Flower (deploy/README.md)."""

from __future__ import annotations

import re

import pytest

from .conftest import BROKER_START, REPO

pytestmark = pytest.mark.deploy

USER_CALL = re.compile(
    r"^\s*user (\w+) \"\$\{(\w+):-\}\" \"([^\"]*)\" \\\n"
    r"\s*'([^']*)' \\\n\s*'([^']*)' \\\n\s*'([^']*)'",
    re.M,
)


def users(text: str | None = None) -> dict[str, dict]:
    found = {}
    for name, var, tags, configure, write, read in USER_CALL.findall(
        BROKER_START.read_text() if text is None else text
    ):
        found[name] = {
            "password": var,
            "tags": tags.split(),
            "configure": configure,
            "write": write,
            "read": read,
        }
    return found


def may(user: dict, permission: str, resource: str) -> bool:
    return re.search(user[permission], resource) is not None


# (user, permission, resource, allowed)
CASES = [
    # gateway: its own amq.gen-* reply queue, publishing through the default exchange
    ("gateway", "configure", "amq.gen-Xy1_z", True),
    ("gateway", "read", "amq.gen-Xy1_z", True),
    ("gateway", "write", "amq.default", True),
    ("gateway", "configure", "url_fetcher_requests", False),
    ("gateway", "read", "url_fetcher_requests", False),
    ("gateway", "read", "url_fetcher_requests.dead", False),
    ("gateway", "write", "celery.pidbox", False),
    ("gateway", "write", "celeryev", False),
    ("gateway", "configure", "celeryev.abc", False),
    # the services' states: gateways declare the exchange and bind a queue of their own to
    # it (write on the queue, read on the exchange); only workers publish to it
    ("gateway", "configure", "proxymq.status", True),
    ("gateway", "read", "proxymq.status", True),
    ("gateway", "write", "amq.gen-Xy1_z", True),
    ("gateway", "write", "proxymq.status", False),
    ("gateway", "configure", "proxymq.statusx", False),
    ("workers", "configure", "proxymq.status", True),
    ("workers", "write", "proxymq.status", True),
    ("workers", "read", "proxymq.status", False),
    ("observer", "write", "proxymq.status", False),
    ("monitoring", "write", "proxymq.status", False),
    # workers: service queues, dead letters, replies, Celery's pidbox/events/gossip/mingle
    ("workers", "configure", "url_fetcher_requests", True),
    ("workers", "configure", "url_fetcher_requests.dead", True),
    ("workers", "read", "url_fetcher_requests", True),
    ("workers", "read", "url_fetcher_requests.dead", False),
    ("workers", "write", "amq.default", True),
    ("workers", "write", "url_fetcher_requests", True),  # bind to Celery's exchange
    ("workers", "read", "celery", True),
    ("workers", "configure", "celery.pidbox", True),
    ("workers", "configure", "url_fetcher.17@host.celery.pidbox", True),
    ("workers", "read", "url_fetcher.17@host.celery.pidbox", True),
    ("workers", "configure", "0c5e.reply.celery.pidbox", True),
    ("workers", "write", "celeryev", True),
    ("workers", "read", "celeryev.3f2a", True),
    # job callbacks and their retry queues (a queue with a dead-letter exchange needs read)
    ("workers", "configure", "url_fetcher_callbacks", True),
    ("workers", "read", "url_fetcher_callbacks", True),
    ("workers", "configure", "url_fetcher_callbacks.retry.5000", True),
    ("workers", "read", "url_fetcher_callbacks.retry.5000", True),
    ("gateway", "read", "url_fetcher_callbacks", False),
    ("gateway", "configure", "url_fetcher_callbacks.retry.5000", False),
    ("observer", "read", "url_fetcher_callbacks", False),
    ("workers", "configure", "proxymq.cancel.5f0c", True),  # its stream cancel queue
    ("workers", "read", "proxymq.cancel.5f0c", True),
    ("gateway", "configure", "proxymq.cancel.5f0c", False),
    ("gateway", "read", "proxymq.cancel.5f0c", False),
    ("observer", "read", "proxymq.cancel.5f0c", False),
    ("workers", "configure", "amq.gen-Xy1_z", False),
    ("workers", "read", "amq.gen-Xy1_z", False),
    ("workers", "configure", "amq.default", False),
    # monitoring: nothing over AMQP
    ("monitoring", "configure", "url_fetcher_requests", False),
    ("monitoring", "read", "url_fetcher_requests", False),
    ("monitoring", "write", "amq.default", False),
    ("monitoring", "read", "celeryev.3f2a", False),
    # observer (Flower, celery-exporter): events and inspect only
    ("observer", "configure", "celeryev.3f2a", True),
    ("observer", "read", "celeryev", True),
    ("observer", "read", "celeryev.3f2a", True),
    ("observer", "write", "celery.pidbox", True),
    ("observer", "configure", "0c5e.reply.celery.pidbox", True),
    ("observer", "read", "0c5e.reply.celery.pidbox", True),
    ("observer", "write", "amq.default", False),
    ("observer", "write", "celeryev", False),
    ("observer", "read", "url_fetcher_requests", False),
    ("observer", "configure", "url_fetcher_requests", False),
    ("observer", "read", "amq.gen-Xy1_z", False),
    ("observer", "read", "url_fetcher.17@host.celery.pidbox", False),
]


def test_one_user_per_role():
    found = users()
    assert set(found) == {"gateway", "workers", "monitoring", "observer"}
    for name, user in found.items():
        assert user["password"] == f"RABBITMQ_{name.upper()}_PASSWORD"
        assert "administrator" not in user["tags"] and "management" not in user["tags"]
        for permission in ("configure", "write", "read"):
            regex = user[permission]
            assert regex.startswith("^") and regex.endswith("$"), (name, permission)
            assert regex not in ("^.*$", ".*"), (name, permission)
    assert found["monitoring"]["tags"] == ["monitoring"]
    assert [u["tags"] for n, u in found.items() if n != "monitoring"] == [[], [], []]
    assert {found["monitoring"][p] for p in ("configure", "write", "read")} == {"^$"}


@pytest.mark.parametrize("name, permission, resource, allowed", CASES)
def test_permission(name, permission, resource, allowed):
    assert may(users()[name], permission, resource) is allowed


def test_users_table_in_the_docs_matches_the_script():
    # in a Markdown table a regex's | is written \|
    docs = (REPO / "docs" / "operating.md").read_text().replace("\\|", "|")
    for name, user in users().items():
        for permission in ("configure", "write", "read"):
            assert f"`{user[permission]}`" in docs, (name, permission)


def test_guest_is_deleted_and_passwords_go_on_stdin():
    text = BROKER_START.read_text()
    assert "delete_user guest" in text
    assert re.search(r"printf '%s' \"\$password\" \| rabbitmqctl -q add_user \"\$name\"", text)
    assert not re.search(r"add_user \"\$name\" \"\$password\"", text)


def test_checks_can_fail():
    broad = BROKER_START.read_text().replace(
        "'^(amq\\.gen-.*|proxymq\\.status)$' \\\n    '^(amq\\.default|amq\\.gen-.*)$'",
        "'.*' \\\n    '.*'",
    )
    assert users(broad)["gateway"]["configure"] == ".*"
    with pytest.raises(AssertionError):
        assert may(users(broad)["gateway"], "configure", "url_fetcher_requests") is False
    assert users("") == {}

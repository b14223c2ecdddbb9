"""broker.operator: the chart on a RabbitMQ cluster run by the RabbitMQ Cluster Operator,
with the broker users made by the Messaging Topology Operator.

The custom resources are validated against the minimal schemas of rabbitmq_crds.py, written
from the operators' API reference (no package reachable from here ships the upstream CRDs;
see that module). The users and permissions must be those of files/rabbitmq-start.sh, as
test_broker_users.py parses them, so compose, the bundled broker and the operators' cluster
grant every role exactly the same."""

from __future__ import annotations

import copy
from urllib.parse import urlsplit

import jsonschema
import pytest

from .conftest import CHART
from .rabbitmq_crds import SCHEMAS
from .test_broker_users import users as script_users
from .test_helm_chart import (
    NAMESPACE,
    RELEASE,
    VALUES_FILES,
    by_kind,
    env_of,
    helm,
    load_values,
    render,
    validate_crds,
)

pytestmark = pytest.mark.deploy

OPERATOR_VALUES = CHART / "ci" / "operator-values.yaml"
CLUSTER = f"{RELEASE}-rabbitmq"
SERVICE_HOST = f"{CLUSTER}.{NAMESPACE}.svc"
MINIMAL = {"broker": {"bundled": {"enabled": False}, "operator": {"enabled": True}}}


def with_operator(**operator) -> dict:
    values = copy.deepcopy(MINIMAL)
    values["broker"]["operator"].update(operator)
    return values


def rabbitmq_objects(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["apiVersion"].startswith("rabbitmq.com/")]


def credentials_secret(role: str) -> str:
    return f"{RELEASE}-broker-{role}-user-credentials"


def users_by_role(docs: list[dict]) -> dict[str, dict]:
    return {
        u["metadata"]["labels"]["proxymq.io/broker-role"]: u for u in by_kind(docs, "User").values()
    }


def test_operator_resources_render_and_validate():
    docs = render(load_values(OPERATOR_VALUES))
    objects = rabbitmq_objects(docs)
    assert {(d["kind"]) for d in objects} == {"RabbitmqCluster", "User", "Permission", "Policy"}
    for doc in objects:
        jsonschema.validate(doc, SCHEMAS[(doc["apiVersion"], doc["kind"])])
    [cluster] = by_kind(docs, "RabbitmqCluster").values()
    spec = cluster["spec"]
    assert cluster["metadata"]["name"] == CLUSTER and spec["replicas"] == 3
    assert spec["tls"] == {
        "secretName": "proxymq-rabbitmq-tls",
        "caSecretName": "proxymq-rabbitmq-ca",
        "disableNonTLSListeners": True,
    }
    assert spec["resources"]["requests"] and spec["resources"]["limits"]
    assert spec["persistence"] == {"storageClassName": "fast-ssd", "storage": "20Gi"}
    assert "pause_minority" in spec["rabbitmq"]["additionalConfig"]
    # users of the chart, each with its Permission on the same vhost of the same cluster
    roles = users_by_role(docs)
    assert set(roles) == {"gateway", "workers", "monitoring", "observer"}
    permissions = by_kind(docs, "Permission")
    for user in roles.values():
        name = user["metadata"]["name"]
        assert user["spec"]["rabbitmqClusterReference"] == {"name": CLUSTER}
        assert permissions[name]["spec"]["userReference"] == {"name": name}
        assert permissions[name]["spec"]["vhost"] == "/"
        assert permissions[name]["spec"]["rabbitmqClusterReference"] == {"name": CLUSTER}
    assert roles["workers"]["spec"]["importCredentialsSecret"] == {
        "name": "proxymq-workers-credentials"
    }
    assert "importCredentialsSecret" not in roles["gateway"]["spec"]
    # no chart-made broker Secret, no bundled StatefulSet: the operators do both
    assert f"{RELEASE}-broker" not in by_kind(docs, "Secret")
    assert not by_kind(docs, "StatefulSet")


@pytest.mark.parametrize(
    "values_file", [None, *VALUES_FILES], ids=lambda p: p.name if p else "default-values"
)
def test_operator_resources_are_off_by_default(values_file):
    values = load_values(values_file)
    docs = render(values)
    enabled = bool(values and values.get("broker", {}).get("operator", {}).get("enabled"))
    assert bool(rabbitmq_objects(docs)) is enabled
    for dep in by_kind(docs, "Deployment").values():
        assert ("RABBITMQ_USERNAME" in env_of(dep)) is (
            enabled and "fetcher" not in dep["metadata"]["name"]
        )


def permissions_by_role(docs: list[dict]) -> dict[str, dict]:
    roles = users_by_role(docs)
    permissions = by_kind(docs, "Permission")
    return {
        role: {
            "tags": user["spec"].get("tags", []),
            **permissions[user["metadata"]["name"]]["spec"]["permissions"],
        }
        for role, user in roles.items()
    }


def script_table() -> dict[str, dict]:
    return {
        name: {k: user[k] for k in ("tags", "configure", "write", "read")}
        for name, user in script_users().items()
    }


def test_users_and_permissions_are_those_of_rabbitmq_start_sh():
    docs = render(load_values(OPERATOR_VALUES))  # observer enabled: all four roles
    script = script_table()
    assert set(script) == {"gateway", "workers", "monitoring", "observer"}
    assert permissions_by_role(docs) == script
    # without observer, the same for the three roles the chart itself runs
    docs = render(MINIMAL)
    assert permissions_by_role(docs) == {r: script[r] for r in ("gateway", "workers", "monitoring")}


def test_permission_check_can_fail():
    docs = render(MINIMAL)
    [gateway] = [
        p
        for p in by_kind(docs, "Permission").values()
        if p["metadata"]["name"].endswith("-gateway")
    ]
    gateway["spec"]["permissions"]["configure"] = ".*"
    assert permissions_by_role(docs) != {
        r: script_table()[r] for r in ("gateway", "workers", "monitoring")
    }


@pytest.mark.parametrize("values_file", [None, OPERATOR_VALUES], ids=["minimal", "operator-values"])
def test_gateway_and_workers_get_operator_secrets_and_quorum_queues(values_file):
    values = load_values(values_file) if values_file else MINIMAL
    docs = render(values)
    tls = values_file is not None
    deployments = {n: d for n, d in by_kind(docs, "Deployment").items() if "fetcher" not in n}
    assert deployments
    for name, dep in deployments.items():
        role = "gateway" if name.endswith("-gateway") else "workers"
        entries = dep["spec"]["template"]["spec"]["containers"][0]["env"]
        env = env_of(dep)
        assert env["PROXYMQ_QUEUE_TYPE"]["value"] == "quorum"
        for var, key in (("RABBITMQ_USERNAME", "username"), ("RABBITMQ_PASSWORD", "password")):
            assert env[var] == {
                "name": var,
                "valueFrom": {"secretKeyRef": {"name": credentials_secret(role), "key": key}},
            }
        # $(VAR) is expanded only from entries defined before it
        order = [e["name"] for e in entries]
        assert order.index("RABBITMQ_USERNAME") < order.index("PROXYMQ_BROKER_URL")
        assert order.index("RABBITMQ_PASSWORD") < order.index("PROXYMQ_BROKER_URL")
        url = urlsplit(env["PROXYMQ_BROKER_URL"]["value"])
        assert url.username == "$(RABBITMQ_USERNAME)" and url.password == "$(RABBITMQ_PASSWORD)"
        assert url.hostname == SERVICE_HOST and url.path == "/%2F"
        assert (url.scheme, url.port) == (("amqps", 5671) if tls else ("amqp", 5672))
        if tls:
            assert env["PROXYMQ_BROKER_CA_FILE"]["value"].endswith("/ca.crt")
    gateway = env_of(deployments[f"{RELEASE}-gateway"])
    assert gateway["PROXYMQ_REPLY_USERS"]["valueFrom"]["secretKeyRef"] == {
        "name": credentials_secret("workers"),
        "key": "username",
    }
    # the Secrets named are those the topology operator writes for the rendered Users
    made = {f"{u['metadata']['name']}-user-credentials" for u in by_kind(docs, "User").values()}
    assert {credentials_secret("gateway"), credentials_secret("workers")} <= made


def test_reply_users_from_values_win():
    values = with_operator()
    values["broker"]["replyUsers"] = ["proxymq-workers"]
    env = env_of(by_kind(render(values), "Deployment")[f"{RELEASE}-gateway"])
    assert env["PROXYMQ_REPLY_USERS"] == {"name": "PROXYMQ_REPLY_USERS", "value": "proxymq-workers"}


def test_connect_via_nodes_is_a_failover_list_of_every_node():
    docs = render(with_operator(connectVia="nodes", cluster={"replicas": 3}))
    env = env_of(by_kind(docs, "Deployment")[f"{RELEASE}-worker-url-fetcher"])
    urls = env["PROXYMQ_BROKER_URL"]["value"].split(";")
    assert [urlsplit(u).hostname for u in urls] == [
        f"{CLUSTER}-server-{i}.{CLUSTER}-nodes.{NAMESPACE}.svc" for i in range(3)
    ]
    assert all(urlsplit(u).port == 5672 and urlsplit(u).scheme == "amqp" for u in urls)


def test_existing_cluster_in_another_namespace():
    docs = render(
        with_operator(cluster={"create": False, "name": "shared-rmq", "namespace": "rabbitmq"})
    )
    assert not by_kind(docs, "RabbitmqCluster")
    for obj in rabbitmq_objects(docs):
        assert obj["spec"]["rabbitmqClusterReference"] == {
            "name": "shared-rmq",
            "namespace": "rabbitmq",
        }
    validate_crds(docs)
    env = env_of(by_kind(docs, "Deployment")[f"{RELEASE}-gateway"])
    assert urlsplit(env["PROXYMQ_BROKER_URL"]["value"]).hostname == "shared-rmq.rabbitmq.svc"


def test_custom_vhost_gets_a_vhost_object():
    docs = render(with_operator(vhost="proxymq"))
    [vhost] = by_kind(docs, "Vhost").values()
    assert vhost["spec"]["name"] == "proxymq"
    validate_crds(docs)
    assert {p["spec"]["vhost"] for p in by_kind(docs, "Permission").values()} == {"proxymq"}
    env = env_of(by_kind(docs, "Deployment")[f"{RELEASE}-gateway"])
    assert urlsplit(env["PROXYMQ_BROKER_URL"]["value"]).path == "/proxymq"


def test_quorum_queue_policy():
    docs = render(MINIMAL)
    [policy] = by_kind(docs, "Policy").values()
    spec = policy["spec"]
    assert spec["pattern"] == ".*_requests$" and spec["applyTo"] == "queues"
    # the queue type is a declare argument; delivery-limit stays the workers' (one above
    # PROXYMQ_MAX_DELIVERIES), a policy must not undercut it
    assert spec["definition"] == {"queue-leader-locator": "balanced"}
    import re

    pattern = re.compile(spec["pattern"])
    assert pattern.search("url_fetcher_requests")
    assert not pattern.search("url_fetcher_requests.dead")
    assert not pattern.search("amq.gen-Xy1_z")
    docs = render(with_operator(queuePolicy={"enabled": False}))
    assert not by_kind(docs, "Policy")


def test_keda_reads_as_the_monitoring_user():
    docs = render(load_values(OPERATOR_VALUES))
    [auth] = by_kind(docs, "TriggerAuthentication").values()
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "username", "name": credentials_secret("monitoring"), "key": "username"},
        {"parameter": "password", "name": credentials_secret("monitoring"), "key": "password"},
    ]
    [scaled] = by_kind(docs, "ScaledObject").values()
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["metadata"]["host"] == f"amqps://{SERVICE_HOST}:5671/%2F"


def test_network_policy_egress_to_the_cluster_pods():
    docs = render(load_values(OPERATOR_VALUES))
    worker = by_kind(docs, "NetworkPolicy")[f"{RELEASE}-worker"]["spec"]
    broker_rules = [
        r
        for r in worker["egress"]
        if any(
            "podSelector" in t
            and t["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == CLUSTER
            for t in r["to"]
        )
    ]
    [rule] = broker_rules
    assert rule["ports"] == [{"port": 5671, "protocol": "TCP"}]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"broker": {"operator": {"enabled": True}}}, "broker.bundled.enabled=false"),
        (
            {
                "broker": {
                    "bundled": {"enabled": False},
                    "operator": {"enabled": True},
                    "gateway": {"url": "amqp://g:p@x/"},
                }
            },
            "leave broker.gateway.url/existingSecret empty",
        ),
        (
            {
                "broker": {
                    "bundled": {"enabled": False},
                    "external": {"queueType": "classic"},
                    "operator": {"enabled": True},
                }
            },
            "needs quorum queues",
        ),
        (
            {
                "broker": {
                    "bundled": {"enabled": False},
                    "operator": {"enabled": True, "cluster": {"tls": {"secretName": "t"}}},
                }
            },
            "broker.tls.existingSecret",
        ),
        (
            {
                "broker": {
                    "bundled": {"enabled": False},
                    "tls": {"existingSecret": "ca"},
                    "operator": {
                        "enabled": True,
                        "connectVia": "nodes",
                        "cluster": {"tls": {"secretName": "t"}},
                    },
                }
            },
            "checked against its own host name",
        ),
        (with_operator(connectVia="dns"), "connectVia"),
        (with_operator(queuePolicy={"definition": {"queue-type": "quorum"}}), "queue-type"),
        (with_operator(users={"admin": {}}), "additional properties 'admin' not allowed"),
    ],
)
def test_bad_operator_values_fail_rendering(values, message):
    with pytest.raises(helm.HelmError) as excinfo:
        render(values)
    assert message in str(excinfo.value)


def test_schemas_catch_wrong_resources():
    docs = render(load_values(OPERATOR_VALUES))
    validate_crds(docs)
    broken = [
        ("RabbitmqCluster", lambda s: s.update(replica=3)),  # misspelt field
        ("RabbitmqCluster", lambda s: s["tls"].update(secret="x")),
        ("User", lambda s: s.update(tags=["admin"])),  # not a RabbitMQ tag
        ("User", lambda s: s.pop("rabbitmqClusterReference")),
        ("Permission", lambda s: s.update(user="x")),  # user and userReference both
        ("Permission", lambda s: s["permissions"].update(configur=".*")),
        ("Policy", lambda s: s.update(applyTo="queue")),
        ("Policy", lambda s: s.pop("definition")),
    ]
    for kind, breaks in broken:
        doc = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
        breaks(doc["spec"])
        with pytest.raises(jsonschema.ValidationError):
            validate_crds([doc])

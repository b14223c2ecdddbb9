"""The Helm chart, rendered with Helm's own Go template engine (helm-python-sdk, no helm
binary, no cluster) and validated with kubernetes-validate --strict; custom resources
(KEDA, Prometheus operator, the RabbitMQ operators), which kubernetes-validate has no schema
for, are checked against minimal schemas below and in rabbitmq_crds.py."""

from __future__ import annotations

import re
import shutil
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from .conftest import BROKER_START, CHART, describe, run
from .rabbitmq_crds import SCHEMAS as RABBITMQ_SCHEMAS

pytestmark = pytest.mark.deploy

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")

# Oldest version the chart supports (Chart.yaml kubeVersion) and a recent one;
# both ship with kubernetes-validate.
KUBERNETES_VERSIONS = ["1.25.0", "1.33.0"]
RELEASE = "proxymq-ci"
NAMESPACE = "proxymq"

VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))

_STR = {"type": "string", "minLength": 1}
_META = {"type": "object", "required": ["name"], "properties": {"name": _STR}}


def _closed(properties: dict, *required: str) -> dict:
    """An object schema that allows only ``properties`` and needs ``required``."""
    schema: dict = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _list_of(item: dict) -> dict:
    return {"type": "array", "minItems": 1, "items": item}


def _resource(spec: dict) -> dict:
    """A custom resource: apiVersion, kind, a named metadata and ``spec``."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _META, "spec": spec},
    }


_RABBITMQ_TRIGGER = _closed(
    {
        "type": {"const": "rabbitmq"},
        "authenticationRef": _closed({"name": _STR}, "name"),
        "metadata": _closed(
            {
                "protocol": {"enum": ["amqp", "http", "auto"]},
                "mode": {"enum": ["QueueLength", "MessageRate"]},
                "queueName": {"type": "string", "pattern": "_requests$"},
                "value": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
                "vhostName": {"type": "string"},
                # with broker.operator: the cluster's Service, never credentials
                "host": {"type": "string", "pattern": "^amqps?://[^@/]+/[^@]*$"},
            },
            "queueName",
            "mode",
            "value",
        ),
    },
    "type",
    "metadata",
    # the monitoring user's credentials, never the worker container's (hostFromEnv)
    "authenticationRef",
)
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): _resource(
        _closed(
            {
                "scaleTargetRef": _closed({"name": _STR, "kind": _STR, "apiVersion": _STR}, "name"),
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": _list_of(_RABBITMQ_TRIGGER),
            },
            "scaleTargetRef",
            "triggers",
        )
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _resource(
        _closed(
            {
                "secretTargetRef": _list_of(
                    _closed(
                        {
                            "parameter": {"enum": ["host", "username", "password"]},
                            "name": _STR,
                            "key": _STR,
                        },
                        "parameter",
                        "name",
                        "key",
                    )
                )
            },
            "secretTargetRef",
        )
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _resource(
        _closed(
            {
                "selector": _closed(
                    {"matchLabels": {"type": "object", "minProperties": 1}}, "matchLabels"
                ),
                "namespaceSelector": _closed(
                    {"matchNames": {"type": "array", "items": _STR}, "any": {"type": "boolean"}}
                ),
                "endpoints": _list_of(
                    _closed(
                        {
                            "port": _STR,
                            "path": _STR,
                            "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                        },
                        "port",
                    )
                ),
            },
            "selector",
            "endpoints",
        )
    ),
    **RABBITMQ_SCHEMAS,
}


def render(values: dict | None) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("namespace", NAMESPACE)
                docs.append(doc)
    return docs


def load_values(path) -> dict | None:
    return yaml.safe_load(path.read_text()) if path else None


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def validate_builtin(docs: list[dict], tmp_path, tool: str) -> None:
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS]
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    for version in KUBERNETES_VERSIONS:
        proc = run([tool, "--strict", "--quiet", "-k", version, str(path)], timeout=120)
        assert proc.returncode == 0, describe(proc)
        # it only warns (exit 0) on a kind it has no schema for: treat that as a failure
        assert "Couldn't find schema" not in proc.stdout + proc.stderr, describe(proc)


def validate_crds(docs: list[dict]) -> None:
    for doc in docs:
        schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema:
            jsonschema.validate(doc, schema)


CASES = [None, *VALUES_FILES]


@pytest.mark.parametrize("values_file", CASES, ids=lambda p: p.name if p else "default-values")
def test_chart_renders_valid_manifests(values_file, tmp_path, kubernetes_validate):
    docs = render(load_values(values_file))
    validate_builtin(docs, tmp_path, kubernetes_validate)
    validate_crds(docs)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"
    check_references(docs)


def check_references(docs: list[dict]) -> None:
    """Cross-object references resolve within the release."""
    deployments = by_kind(docs, "Deployment") | by_kind(docs, "StatefulSet")
    configmaps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    auths = by_kind(docs, "TriggerAuthentication")
    for obj in deployments.values():
        pod = obj["spec"]["template"]["spec"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for vol in pod.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps
        for container in pod["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] in secrets:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    for svc in by_kind(docs, "Service").values():
        selector = svc["spec"]["selector"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments.values()
        ), f"Service {svc['metadata']['name']} selects nothing"
    for so in by_kind(docs, "ScaledObject").values():
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "KEDA-scaled Deployment must not set replicas"
        for trigger in so["spec"]["triggers"]:
            auth = auths[trigger["authenticationRef"]["name"]]
            assert "hostFromEnv" not in trigger["metadata"]
            refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
            if set(refs) == {"username", "password"}:  # broker.operator
                worker_env = env_of(target)
                for parameter, ref in refs.items():
                    worker_ref = worker_env[f"RABBITMQ_{parameter.upper()}"]["valueFrom"]
                    assert ref["name"] != worker_ref["secretKeyRef"]["name"], ref
                    assert ref["name"].endswith("-broker-monitoring-user-credentials"), ref
                assert "@" not in trigger["metadata"]["host"]
                continue
            [ref] = refs.values()
            assert ref["parameter"] == "host"
            if ref["name"] in secrets:
                assert ref["key"] == "monitoring-url", ref
                assert urlsplit(secrets[ref["name"]]["stringData"][ref["key"]]).username in (
                    "monitoring",
                    None,
                )
            worker_ref = env_of(target)["PROXYMQ_BROKER_URL"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) != (worker_ref["name"], worker_ref["key"])


def env_of(obj: dict, container: int = 0) -> dict[str, dict]:
    return {e["name"]: e for e in obj["spec"]["template"]["spec"]["containers"][container]["env"]}


def test_default_values_minimal_install():
    docs = render(None)
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {
        f"{RELEASE}-gateway",
        f"{RELEASE}-worker-url-fetcher",
        f"{RELEASE}-fetcher",
    }
    gateway = deployments[f"{RELEASE}-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["resources"]["requests"]
    assert any(a.startswith("--workers=") for a in gateway["args"])
    assert any(a.startswith("--timeout=") for a in gateway["args"])
    worker = deployments[f"{RELEASE}-worker-url-fetcher"]["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert worker["command"] + worker["args"][:5] == [
        "celery",
        "-A",
        "workers",
        "worker",
        "-Q",
        "url_fetcher_requests",
    ]
    env = {e["name"]: e for e in worker["env"]}
    assert env["PROXYMQ_CONFIG"]["value"] == "/etc/proxymq/proxymq.toml"
    assert env["PROXYMQ_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{RELEASE}-broker",
        "key": "workers-url",
    }
    assert env["PROXYMQ_QUEUE_TYPE"]["value"] == "classic"
    assert "PROXYMQ_RESULT_URL" not in env and "PROXYMQ_BROKER_CA_FILE" not in env
    gateway_env = {e["name"]: e for e in gateway["env"]}
    assert gateway_env["PROXYMQ_BROKER_URL"]["valueFrom"]["secretKeyRef"]["key"] == "gateway-url"
    assert gateway_env["PROXYMQ_REPLY_USERS"]["value"] == "workers"
    secret = by_kind(docs, "Secret")[f"{RELEASE}-broker"]["stringData"]
    for role in ("gateway", "workers", "monitoring"):
        url = urlsplit(secret[f"{role}-url"])
        assert url.username == role and url.password == secret[f"RABBITMQ_{role.upper()}_PASSWORD"]
        assert url.hostname == f"{RELEASE}-rabbitmq.{NAMESPACE}.svc"  # KEDA runs elsewhere
        assert len(url.password) >= 24
    assert not by_kind(docs, "NetworkPolicy") and not by_kind(docs, "TriggerAuthentication")
    assert set(by_kind(docs, "StatefulSet")) == {f"{RELEASE}-rabbitmq"}
    assert by_kind(docs, "PodDisruptionBudget")
    toml = by_kind(docs, "ConfigMap")[f"{RELEASE}-config"]["data"]["proxymq.toml"]
    assert "[services.url_fetcher]" in toml
    assert f'downstream_url = "http://{RELEASE}-fetcher:8080"' in toml


def test_all_options():
    docs = render(load_values(CHART / "ci" / "all-options-values.yaml"))
    kinds = {d["kind"] for d in docs}
    assert {
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PodDisruptionBudget",
        "StatefulSet",
    } <= kinds
    deployments = by_kind(docs, "Deployment")
    sidecar = deployments[f"{RELEASE}-worker-model"]["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in sidecar] == ["worker", "model-server"]
    toml = by_kind(docs, "ConfigMap")[f"{RELEASE}-config"]["data"]["proxymq.toml"]
    assert 'downstream_url = "http://127.0.0.1:9000"' in toml
    assert "batch_size = 20" in toml and "batch_url" in toml
    import tomllib

    parsed = tomllib.loads(toml)["services"]
    assert parsed["url_fetcher_batch"]["batch_size"] == 20
    assert parsed["model"]["health_url"] == "http://127.0.0.1:9000/health"
    scaled = {so["spec"]["scaleTargetRef"]["name"] for so in by_kind(docs, "ScaledObject").values()}
    assert scaled == {f"{RELEASE}-worker-url-fetcher", f"{RELEASE}-worker-model"}
    assert deployments[f"{RELEASE}-worker-url-fetcher-batch"]["spec"]["replicas"] == 2
    gateway_env = {
        e["name"]: e.get("value")
        for e in deployments[f"{RELEASE}-gateway"]["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
    }
    assert gateway_env["PROXYMQ_SERVICES"] == "url_fetcher,url_fetcher_batch,model,legacy"


def test_external_broker_uses_quorum_queues_and_a_secret_per_role():
    docs = render(load_values(CHART / "ci" / "external-broker-values.yaml"))
    assert not by_kind(docs, "StatefulSet")
    assert set(by_kind(docs, "Secret")) == {f"{RELEASE}-jobs"}  # no broker URL in the chart
    deployments = by_kind(docs, "Deployment")
    expected = {
        f"{RELEASE}-gateway": {"name": "proxymq-gateway-broker", "key": "url"},
        f"{RELEASE}-worker-orders": {"name": "proxymq-workers-broker", "key": "amqp-url"},
        f"{RELEASE}-worker-search": {"name": "proxymq-workers-broker", "key": "amqp-url"},
    }
    for name, dep in deployments.items():
        env = env_of(dep)
        assert env["PROXYMQ_QUEUE_TYPE"]["value"] == "quorum"
        assert env["PROXYMQ_BROKER_URL"]["valueFrom"]["secretKeyRef"] == expected[name]
        assert env["PROXYMQ_RESULT_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{RELEASE}-jobs",
            "key": "PROXYMQ_RESULT_URL",
        }
        assert ("PROXYMQ_CALLBACK_SECRET" in env) is ("worker" in name)
    assert env_of(deployments[f"{RELEASE}-gateway"])["PROXYMQ_REPLY_USERS"]["value"] == (
        "proxymq-workers"
    )
    [auth] = by_kind(docs, "TriggerAuthentication").values()
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": "proxymq-monitoring-broker", "key": "url"}
    ]
    jobs = by_kind(docs, "Secret")[f"{RELEASE}-jobs"]["stringData"]
    assert jobs == {
        "PROXYMQ_RESULT_URL": "redis://redis.shop.svc:6379/0",
        "PROXYMQ_CALLBACK_SECRET": "not-a-real-key",
    }


def test_external_broker_urls_in_values_go_to_the_chart_secret():
    docs = render(
        {
            "broker": {
                "bundled": {"enabled": False},
                "gateway": {"url": "amqp://gw:p1@rabbit.example:5672/%2F"},
                "workers": {"url": "amqp://wk:p2@rabbit.example:5672/%2F"},
            }
        }
    )
    secret = by_kind(docs, "Secret")[f"{RELEASE}-broker"]
    assert secret["stringData"] == {
        "gateway-url": "amqp://gw:p1@rabbit.example:5672/%2F",
        "workers-url": "amqp://wk:p2@rabbit.example:5672/%2F",
    }
    assert "PROXYMQ_REPLY_USERS" not in env_of(by_kind(docs, "Deployment")[f"{RELEASE}-gateway"])


SECRET_SETTINGS = [
    # values, deployment, env name, expected secretKeyRef
    (
        {
            "broker": {
                "bundled": {"enabled": False},
                "gateway": {"existingSecret": "gw"},
                "workers": {"existingSecret": "wk", "existingSecretKey": "u"},
            }
        },
        "gateway",
        "PROXYMQ_BROKER_URL",
        {"name": "gw", "key": "url"},
    ),
    (
        {
            "broker": {
                "bundled": {"enabled": False},
                "gateway": {"existingSecret": "gw"},
                "workers": {"existingSecret": "wk", "existingSecretKey": "u"},
            }
        },
        "worker-url-fetcher",
        "PROXYMQ_BROKER_URL",
        {"name": "wk", "key": "u"},
    ),
    (
        {"jobs": {"resultUrl": {"existingSecret": "redis", "existingSecretKey": "url"}}},
        "gateway",
        "PROXYMQ_RESULT_URL",
        {"name": "redis", "key": "url"},
    ),
    (
        {"jobs": {"resultUrl": {"existingSecret": "redis"}}},
        "worker-url-fetcher",
        "PROXYMQ_RESULT_URL",
        {"name": "redis", "key": "PROXYMQ_RESULT_URL"},
    ),
    (
        {"jobs": {"callbackSecret": {"existingSecret": "cb", "existingSecretKey": "k"}}},
        "worker-url-fetcher",
        "PROXYMQ_CALLBACK_SECRET",
        {"name": "cb", "key": "k"},
    ),
]


@pytest.mark.parametrize("values, deployment, name, ref", SECRET_SETTINGS)
def test_existing_secret_renders_secret_key_ref(values, deployment, name, ref):
    docs = render(values)
    env = env_of(by_kind(docs, "Deployment")[f"{RELEASE}-{deployment}"])
    assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": ref}}
    secrets = by_kind(docs, "Secret")
    for secret in secrets.values():  # the value itself is nowhere in the chart
        assert name not in secret["stringData"]
    if name == "PROXYMQ_BROKER_URL":
        assert f"{RELEASE}-broker" not in secrets


def test_secret_values_never_render_as_plain_env():
    docs = render(load_values(CHART / "ci" / "external-broker-values.yaml"))
    for dep in by_kind(docs, "Deployment").values():
        for container in dep["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"] in (
                    "PROXYMQ_BROKER_URL",
                    "PROXYMQ_RESULT_URL",
                    "PROXYMQ_CALLBACK_SECRET",
                ):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_broker_tls_secret_is_mounted_as_files():
    docs = render({"broker": {"tls": {"existingSecret": "broker-tls"}}})
    for dep in (d for n, d in by_kind(docs, "Deployment").items() if "fetcher" not in n):
        pod = dep["spec"]["template"]["spec"]
        [volume] = [v for v in pod["volumes"] if v["name"] == "broker-tls"]
        assert volume["secret"]["secretName"] == "broker-tls"
        assert {i["key"] for i in volume["secret"]["items"]} == {"ca.crt", "tls.crt", "tls.key"}
        assert volume["secret"]["defaultMode"] == 0o440
        [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "broker-tls"]
        assert mount["readOnly"] is True
        directory = mount["mountPath"]
        env = env_of(dep)
        assert env["PROXYMQ_BROKER_CA_FILE"]["value"] == f"{directory}/ca.crt"
        assert env["PROXYMQ_BROKER_CERT_FILE"]["value"] == f"{directory}/tls.crt"
        assert env["PROXYMQ_BROKER_KEY_FILE"]["value"] == f"{directory}/tls.key"
    docs = render({"broker": {"tls": {"existingSecret": "ca-only", "clientCertificate": False}}})
    env = env_of(by_kind(docs, "Deployment")[f"{RELEASE}-gateway"])
    assert "PROXYMQ_BROKER_CA_FILE" in env and "PROXYMQ_BROKER_CERT_FILE" not in env


def test_network_policies_when_enabled(tmp_path, kubernetes_validate):
    docs = render({"networkPolicy": {"enabled": True}})
    validate_builtin(docs, tmp_path, kubernetes_validate)
    policies = by_kind(docs, "NetworkPolicy")
    assert set(policies) == {f"{RELEASE}-{n}" for n in ("gateway", "worker", "fetcher", "broker")}
    gateway = policies[f"{RELEASE}-gateway"]["spec"]
    assert gateway["policyTypes"] == ["Ingress", "Egress"]
    [rule] = gateway["ingress"]
    assert "from" not in rule and rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    worker = policies[f"{RELEASE}-worker"]["spec"]
    [rule] = worker["ingress"]
    assert rule["ports"] == [{"port": 8001, "protocol": "TCP"}] and rule["from"]
    egress_ports = {p["port"] for r in worker["egress"] for p in r["ports"]}
    assert egress_ports == {53, 5672, 8080}  # DNS, the broker, the fetcher
    broker = policies[f"{RELEASE}-broker"]["spec"]
    assert {p["port"] for r in broker["ingress"] for p in r["ports"]} == {5672, 15692}
    # every policy selects pods of this release that exist
    pods = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in (by_kind(docs, "Deployment") | by_kind(docs, "StatefulSet")).values()
    ]
    for policy in policies.values():
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels in pods), policy["metadata"]
    external = render(load_values(CHART / "ci" / "external-broker-values.yaml"))
    worker = by_kind(external, "NetworkPolicy")[f"{RELEASE}-worker"]["spec"]
    assert {p["port"] for r in worker["egress"] for p in r["ports"]} == {53, 5672, 5671, 8080, 80}


@pytest.mark.parametrize("values_file", CASES, ids=lambda p: p.name if p else "default-values")
def test_no_guest_and_no_admin_user(values_file):
    docs = render(load_values(values_file))
    text = yaml.safe_dump_all(docs)
    assert not re.search(r"guest[:@]|//guest|loopback_users\.guest = false", text)
    assert "RABBITMQ_DEFAULT_USER" not in text and "RABBITMQ_DEFAULT_PASS" not in text
    for sts in by_kind(docs, "StatefulSet").values():
        container = sts["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["bash", "/opt/proxymq/rabbitmq-start.sh"]
        assert "proxymq-users-ready" in " ".join(container["readinessProbe"]["exec"]["command"])
        assert set(env_of(sts)) == {
            "RABBITMQ_GATEWAY_PASSWORD",
            "RABBITMQ_WORKERS_PASSWORD",
            "RABBITMQ_MONITORING_PASSWORD",
        }
    for cm in by_kind(docs, "ConfigMap").values():
        if "rabbitmq-start.sh" in cm["data"]:  # the very script compose.yml runs
            assert cm["data"]["rabbitmq-start.sh"] == BROKER_START.read_text()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"workers": [{"name": "bad.name"}]}, "bad.name"),
        ({"gatway": {"replicas": 2}}, "additional properties 'gatway' not allowed"),
        ({"workers": [{"name": "a", "kdea": {}}]}, "additional properties 'kdea' not allowed"),
        ({"workers": [{"name": "jobs"}]}, "reserved"),
        ({"broker": {"bundled": {"enabled": False}}}, "broker"),
        ({"fetcher": {"enabled": False}}, "needs downstreamUrl"),
        ({"workers": [{"name": "a", "config": {"batchSize": 3}}]}, "lower_snake_case"),
        ({"broker": {"gateway": {"url": "amqp://g:p@x//"}}}, "bundled broker makes its own"),
        (
            {"broker": {"bundled": {"enabled": False}, "gateway": {"existingSecret": "g"}}},
            "broker.workers",
        ),
        (
            {
                "broker": {
                    "bundled": {"enabled": False},
                    "gateway": {"existingSecret": "g"},
                    "workers": {"existingSecret": "w"},
                },
                "workerDefaults": {"keda": {"enabled": True}},
            },
            "broker.monitoring",
        ),
        ({"broker": {"existingSecret": "old"}}, "additional properties 'existingSecret'"),
        ({"keda": {"useTriggerAuthentication": False}}, "additional properties 'keda'"),
    ],
)
def test_bad_values_fail_rendering(values, message):
    with pytest.raises(helm.HelmError) as excinfo:
        render(values)
    assert message in str(excinfo.value)


def test_lint_strict():
    report = helm.lint(str(CHART), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_checks_catch_broken_charts(tmp_path, kubernetes_validate):
    """A template error and an unknown field are both caught."""
    broken = tmp_path / "proxymq"
    shutil.copytree(CHART, broken)
    gateway = broken / "templates" / "gateway.yaml"
    gateway.write_text(
        gateway.read_text().replace(
            "{{ .Values.gateway.replicas }}", "{{ .Values.gateway.replicas | nosuchfunc }}"
        )
    )
    with pytest.raises(helm.HelmError), helm.Chart.load(str(broken)) as chart:
        chart.render(None, name=RELEASE, namespace=NAMESPACE)
    docs = render(None)
    dep = by_kind(docs, "Deployment")[f"{RELEASE}-gateway"]
    dep["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {
        "httpGet": {"path": "/healthz"}
    }
    with pytest.raises(AssertionError):
        validate_builtin(docs, tmp_path, kubernetes_validate)
    so = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {
            "scaleTargetRef": {"name": "x"},
            "triggers": [
                {
                    "type": "rabbitmq",
                    "metadata": {"queueName": "x_requests", "mode": "QueueLenght", "value": "5"},
                }
            ],
        },
    }
    with pytest.raises(jsonschema.ValidationError):
        validate_crds([so])

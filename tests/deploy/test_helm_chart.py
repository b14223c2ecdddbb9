"""The Helm chart, rendered with Helm's own Go template engine (helm-python-sdk, no helm
binary, no cluster) and validated with kubernetes-validate --strict; custom resources
(KEDA, Prometheus operator), which kubernetes-validate has no schema for, are checked
against minimal schemas below."""

from __future__ import annotations

import shutil

import jsonschema
import pytest
import yaml

from .conftest import CHART, describe, run

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
                "hostFromEnv": _STR,
                "vhostName": {"type": "string"},
            },
            "queueName",
            "mode",
            "value",
        ),
    },
    "type",
    "metadata",
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
                        {"parameter": {"const": "host"}, "name": _STR, "key": _STR},
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
            if "authenticationRef" in trigger:
                assert trigger["authenticationRef"]["name"] in auths
            else:
                env_names = {
                    e["name"] for e in target["spec"]["template"]["spec"]["containers"][0]["env"]
                }
                assert trigger["metadata"]["hostFromEnv"] in env_names


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
    assert env["PROXYMQ_BROKER_URL"]["valueFrom"]["secretKeyRef"]["key"] == "PROXYMQ_BROKER_URL"
    assert env["PROXYMQ_QUEUE_TYPE"]["value"] == "classic"
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


def test_external_broker_uses_quorum_queues():
    docs = render(load_values(CHART / "ci" / "external-broker-values.yaml"))
    assert not by_kind(docs, "StatefulSet") and not by_kind(docs, "Secret")
    for dep in by_kind(docs, "Deployment").values():
        env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["PROXYMQ_QUEUE_TYPE"]["value"] == "quorum"
        assert env["PROXYMQ_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "proxymq-rabbitmq-url",
            "key": "url",
        }


def test_external_broker_url_secret():
    docs = render(
        {
            "broker": {
                "bundled": {"enabled": False},
                "external": {"url": "amqp://u:p@rabbit.example:5672/%2F"},
            }
        }
    )
    secret = by_kind(docs, "Secret")[f"{RELEASE}-broker"]
    assert secret["stringData"] == {"PROXYMQ_BROKER_URL": "amqp://u:p@rabbit.example:5672/%2F"}


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

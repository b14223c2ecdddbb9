"""compose.yml and the Dockerfile(s): schema, docker-compose v1, hadolint, structure."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import yaml

from .conftest import BROKER_START, COMPOSE, DEPLOY, ENV_EXAMPLE, REPO, describe, run

pytestmark = pytest.mark.deploy

PYTHON_SERVICES = {"gateway", "worker", "fetcher", "flower", "words", "words-worker"}
TRACING_SERVICES = {"otel-collector", "jaeger"}
ALL_SERVICES = PYTHON_SERVICES | {"rabbitmq", "celery-exporter", "prometheus", "grafana"}
ALL_SERVICES |= TRACING_SERVICES


def dockerfiles() -> list:
    found = sorted(
        p
        for p in REPO.rglob("Dockerfile*")
        if not p.name.endswith(".dockerignore")
        and ".venv" not in p.parts
        and ".tox" not in p.parts
        and ".git" not in p.parts
    )
    assert found, "no Dockerfile found"
    return found


def compose_schema(check_jsonschema, path):
    # The compose-spec schema is bundled with check-jsonschema: no network needed.
    return run([check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(path)])


REQUIRED = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]*\}")


def env_example() -> dict[str, str]:
    """The variables .env.example lists (values empty there)."""
    names = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            names[name] = value
    return names


def filled_env() -> dict[str, str]:
    """A process environment with every .env.example variable set to a test value."""
    base = {k: v for k, v in os.environ.items() if k not in env_example()}
    return base | {name: f"test-{name.lower()}" for name in env_example()}


def compose_v1(path, env=None):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (v1) not installed: apt-get install -y docker-compose")
    return run(
        [binary, "-f", str(path), "config", "-q"],
        cwd=path.parent,
        env=filled_env() if env is None else env,
    )


def compose_copy(tmp_path, data=None):
    """compose.yml (or ``data``) in a directory of its own: no .env next to it."""
    path = tmp_path / "compose.yml"
    path.write_text(COMPOSE.read_text() if data is None else yaml.safe_dump(data))
    (tmp_path / "deploy").mkdir(exist_ok=True)  # bind-mount sources must exist for v1
    return path


def test_compose_matches_compose_spec_schema(check_jsonschema):
    proc = compose_schema(check_jsonschema, COMPOSE)
    assert proc.returncode == 0, describe(proc)


def test_compose_accepted_by_docker_compose_v1():
    proc = compose_v1(COMPOSE)
    assert proc.returncode == 0, describe(proc)


def test_env_example_lists_exactly_the_required_variables():
    required = set(REQUIRED.findall(COMPOSE.read_text()))
    assert required == set(env_example()), "compose.yml's ${VAR:?} and .env.example differ"
    assert all(value == "" for value in env_example().values()), ".env.example holds a value"
    assert ".env" in (REPO / ".gitignore").read_text().split()


@pytest.mark.parametrize("missing", sorted(env_example()))
def test_compose_refuses_to_start_without_each_password(tmp_path, missing):
    env = filled_env()
    env[missing] = ""  # empty counts as missing for ${VAR:?}
    proc = compose_v1(compose_copy(tmp_path), env=env)
    assert proc.returncode != 0 and missing in proc.stderr, describe(proc)


def published_ports(svc: dict) -> list[str]:
    ports = svc.get("ports", [])
    assert all(isinstance(p, str) for p in ports), "write ports as host_ip:host:container"
    return ports


def test_every_published_port_is_bound_to_localhost():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    ports = [(name, p) for name, svc in services.items() for p in published_ports(svc)]
    assert ports
    for name, port in ports:
        assert port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)


def broker_urls(services: dict) -> dict[str, str]:
    """Every AMQP/management URL in compose.yml, by where it is."""
    found = {}
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if isinstance(value, str) and re.match(r"(amqps?|https?)://[^/]*@", value):
                found[f"{name}.{key}"] = value
        for arg in svc.get("command") or []:
            if arg.startswith("--broker-url="):
                found[f"{name}.--broker-url"] = arg.split("=", 1)[1]
    return found


def url_user(url: str) -> str:
    """The user of scheme://user:password@host/... (urlsplit stops at the ? of ${VAR:?})."""
    return url.split("://", 1)[1].split(":", 1)[0]


def test_each_role_connects_as_its_own_broker_user_with_a_required_password():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    users = {where: url_user(url) for where, url in broker_urls(services).items()}
    assert users == {
        "gateway.PROXYMQ_BROKER_URL": "gateway",
        "worker.PROXYMQ_BROKER_URL": "workers",
        "words-worker.PROXYMQ_BROKER_URL": "workers",
        "flower.PROXYMQ_BROKER_URL": "observer",
        "flower.FLOWER_BROKER_API": "monitoring",
        "celery-exporter.--broker-url": "observer",
    }
    for where, url in broker_urls(services).items():
        password = url.split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]
        assert REQUIRED.fullmatch(password), f"{where}: password must be ${{VAR:?}}"
    assert services["gateway"]["environment"]["PROXYMQ_REPLY_USERS"] == "workers"


def test_no_guest_credentials_anywhere():
    texts = {COMPOSE: COMPOSE.read_text()}
    texts |= {p: p.read_text() for p in (DEPLOY / "rabbitmq").iterdir()}
    for path, text in texts.items():
        assert not re.search(r"guest[:@]|//guest|guest/guest", text), path
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "loopback_users.guest = false" not in conf
    assert "delete_user guest" in BROKER_START.read_text()


def test_flower_grafana_prometheus_locked_down():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    flower = services["flower"]["environment"]
    user, _, password = flower["FLOWER_BASIC_AUTH"].partition(":")
    assert user and REQUIRED.fullmatch(password)
    assert "FLOWER_UNAUTHENTICATED_API" not in flower
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert REQUIRED.fullmatch(grafana["GF_SECURITY_ADMIN_PASSWORD"])
    assert not any(k.startswith("GF_AUTH_ANONYMOUS_ORG") for k in grafana)
    assert "--web.enable-lifecycle" not in services["prometheus"]["command"]
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["command"] == ["bash", "/opt/proxymq/rabbitmq-start.sh"]
    assert "/tmp/proxymq-users-ready" in " ".join(rabbitmq["healthcheck"]["test"])
    assert any(
        v.startswith("./deploy/helm/proxymq/files/rabbitmq-start.sh:") for v in rabbitmq["volumes"]
    )


def test_lockdown_checks_can_fail(tmp_path):
    """The checks above catch the old defaults."""
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["gateway"]["ports"] = ["8000:8000"]
    with pytest.raises(AssertionError):
        for port in published_ports(data["services"]["gateway"]):
            assert port.startswith("127.0.0.1:") and port.count(":") == 2
    data["services"]["gateway"]["environment"]["PROXYMQ_BROKER_URL"] = "amqp://guest:guest@x//"
    urls = broker_urls(data["services"])
    assert url_user(urls["gateway.PROXYMQ_BROKER_URL"]) == "guest"
    assert not REQUIRED.fullmatch("guest")
    # a compose file without the ${VAR:?} guards starts without a .env
    data = yaml.safe_load(COMPOSE.read_text())
    for svc in data["services"].values():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if isinstance(value, str):
                env[key] = REQUIRED.sub("x", value)
        svc["command"] = [REQUIRED.sub("x", c) for c in svc.get("command") or []] or None
        if svc["command"] is None:
            del svc["command"]
    if shutil.which("docker-compose"):
        empty = {k: v for k, v in os.environ.items() if k not in env_example()}
        assert compose_v1(compose_copy(tmp_path, data), env=empty).returncode == 0


def test_broken_compose_is_rejected(check_jsonschema, tmp_path):
    """The two checks above can fail: an unknown key inside a service breaks both."""
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["gateway"]["healthcheck"]["retires"] = 3
    broken = compose_copy(tmp_path, data)
    assert compose_schema(check_jsonschema, broken).returncode != 0
    if shutil.which("docker-compose"):
        assert compose_v1(broken).returncode != 0


def test_compose_services_and_startup_order():
    data = yaml.safe_load(COMPOSE.read_text())
    assert "name" not in data and "version" not in data
    services = data["services"]
    assert set(services) == ALL_SERVICES
    for name in PYTHON_SERVICES:
        build = services[name]["build"]
        assert build["context"] == "." and build["dockerfile"] == "deploy/Dockerfile", name
    assert services["rabbitmq"]["healthcheck"]["test"][:2] == [
        "CMD-SHELL",
        "rabbitmq-diagnostics -q ping && test -e /tmp/proxymq-users-ready",
    ]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
            assert "healthcheck" in services[dep], (
                f"{name} waits for {dep}, which has no healthcheck"
            )
    worker_cmd = services["worker"]["command"]
    assert (
        worker_cmd[:4] == ["celery", "-A", "workers", "worker"]
        and "url_fetcher_requests" in worker_cmd
    )
    env = services["worker"]["environment"]
    assert env["PROXYMQ_SERVICE"] == "url_fetcher"
    assert env["PROXYMQ_DOWNSTREAM_URL"] == "http://fetcher:8080"
    # the streaming example and its worker, which shares the worker's broker user and env
    words_cmd = services["words-worker"]["command"]
    assert words_cmd[:4] == ["celery", "-A", "workers", "worker"] and "words_requests" in words_cmd
    words_env = services["words-worker"]["environment"]
    assert words_env["PROXYMQ_SERVICE"] == "words"
    assert words_env["PROXYMQ_DOWNSTREAM_URL"] == "http://words:8090"
    assert set(words_env) == set(env)
    assert services["words"]["command"][:2] == ["gunicorn", "examples.words:app"]
    assert "ports" not in services["words"]  # reached through the gateway only
    assert services["flower"]["environment"]["FLOWER_BROKER_API"].startswith("http://")
    # every bind-mounted file exists
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), src


def test_tracing_is_a_profile_and_off_by_default():
    """Collector and Jaeger start only with ``--profile tracing``; the ProxyMQ processes
    export to the collector only when OTEL_TRACES_EXPORTER is set where compose runs."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in TRACING_SERVICES:
        assert services[name]["profiles"] == ["tracing"], name
    for name in ALL_SERVICES - TRACING_SERVICES:
        assert "profiles" not in services[name], name
    for name in ("gateway", "worker", "fetcher"):
        env = services[name]["environment"]
        assert env["OTEL_TRACES_EXPORTER"] == "${OTEL_TRACES_EXPORTER:-none}", name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318", name
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "127.0.0.1:16686:16686" in services["jaeger"]["ports"]
    collector = yaml.safe_load((DEPLOY / "otel" / "collector.yml").read_text())
    pipeline = collector["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    assert collector["exporters"][pipeline["exporters"][0]]["endpoint"] == "jaeger:4317"
    assert any(
        v.startswith("./deploy/otel/collector.yml:") for v in services["otel-collector"]["volumes"]
    )


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint(hadolint, dockerfile):
    proc = run([hadolint, str(dockerfile)])
    assert proc.returncode == 0, describe(proc)


def test_hadolint_catches_problems(hadolint, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\nCMD python\n")
    assert run([hadolint, str(bad)]).returncode != 0


def test_dockerfile_shape():
    text = (DEPLOY / "Dockerfile").read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage build expected"
    assert "python:3.11" in text
    for var in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"):
        assert var in text
    assert "\nUSER " in text and "USER root" not in text
    assert "COPY gunicorn.conf.py" in text
    assert 'CMD ["gunicorn", "gateway:app"]' in text


def test_image_installs_the_lock_and_nothing_else():
    """The image's packages are the hash-checked lock's: the project's own wheel goes in
    without resolving dependencies, and pip check fails the build if the lock lacks one."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert "COPY requirements.lock" in text
    assert "pip install --no-deps --require-hashes -r requirements.lock" in text
    assert "pip install --no-deps /wheels/*.whl" in text
    assert "pip check" in text
    lock = (REPO / "requirements.lock").read_text()
    assert "--hash=sha256:" in lock
    for name in ("celery", "flask", "gunicorn", "opentelemetry-sdk"):
        assert f"\n{name}==" in lock, name

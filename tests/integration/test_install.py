"""A fresh clone installs with the pip its venv ships (issue 22: the contrib packages of
OpenTelemetry once made pip 23 give up with ``ResolutionImpossible``). No upgrade of pip
first, no lock: the ranges in ``setup.cfg`` alone must resolve."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_fresh_venv_installs_the_package_with_its_own_pip(tmp_path):
    source = tmp_path / "proxymq"
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "--version"], check=True, capture_output=True, text=True
    ).stdout
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "-e", str(source)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert installed.returncode == 0, (pip, installed.stderr[-2000:])
    imported = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import gateway, workers, fetcher, proxymq"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr[-2000:]

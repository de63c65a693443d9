"""Installing the package never replaces the torch a user already has: pip's own resolver, asked for
the project's declared dependencies (pyproject.toml) in a venv that sees this environment's packages
plus a stand-in for a newer torch, would install no torch, and a user pinning that newer torch gets
no ResolutionImpossible."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def dependencies():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def requirements_txt():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_requirements_txt_lists_the_runtime_dependencies_only():
    assert requirements_txt() == dependencies()
    assert not [line for line in requirements_txt() if line.startswith("pytest")]


def test_torch_has_no_upper_bound():
    torch = [d for d in dependencies() if d.startswith("torch")]
    assert torch and "<" not in torch[0] and "==" not in torch[0], torch


def planned_installs(venv_python, *extra):
    """What `pip install --dry-run` of the project's dependencies would install there (no config
    files: this machine's pip.conf caps torch, a user's does not)."""
    report = Path(venv_python).parent.parent / "report.json"
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([venv_python, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                           str(report),
                           *dependencies(), *extra], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


@pytest.fixture(scope="module")
def venv_with_newer_torch(tmp_path_factory):
    """A venv over this environment's packages, with the metadata of a torch newer than any
    tested."""
    folder = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(folder)],
                   check=True, timeout=120)
    python = folder / "bin" / "python"
    purelib = subprocess.run([python, "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    info = Path(purelib) / "torch-2.99.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.99.0\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")
    return python


@pytest.mark.slow
def test_installing_over_the_current_torch_installs_no_torch(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")],
                   check=True, timeout=120)
    assert "torch" not in planned_installs(tmp_path / "venv" / "bin" / "python")


@pytest.mark.slow
def test_installing_over_a_newer_torch_keeps_it(venv_with_newer_torch, tmp_path):
    assert "torch" not in planned_installs(venv_with_newer_torch)
    pin = tmp_path / "pin.txt"
    pin.write_text("torch==2.99.0\n")  # a user who pins their torch: no ResolutionImpossible
    assert "torch" not in planned_installs(venv_with_newer_torch, "-c", str(pin))


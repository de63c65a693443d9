"""The source's style as ruff checks it with the project's settings (pyproject.toml:
pycodestyle errors and warnings with lines of at most 100 characters, pyflakes, import order),
over every Python file of the repository."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ruff() -> list[str]:
    """The ruff command: the module of the [test] extra, or an executable on PATH."""
    probe = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "ruff"]
    found = shutil.which("ruff")
    assert found, "ruff is not installed: pip install -e '.[test]' installs it"
    return [found]


def test_ruff_finds_nothing():
    result = subprocess.run([*ruff(), "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_ruff_fails_on_a_long_line(tmp_path):
    """The check can fail: a line of 101 characters is refused with the project's settings."""
    bad = tmp_path / "bad.py"
    bad.write_text("x = " + repr("a" * 95) + "\n")
    settings = str(ROOT / "pyproject.toml")
    result = subprocess.run([*ruff(), "check", "--no-cache", "--config", settings, str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "E501" in result.stdout

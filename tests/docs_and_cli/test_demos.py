"""Every demo answers `--help` at once: usage and a description, without loading a model or writing
output (a new file in demos/ is covered by the glob)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEMOS = sorted((Path(__file__).resolve().parents[2] / "demos").glob("*.py"))
HANG_GUARD_S = 60  # a hang guard, not a speed claim: --help takes a second or two


def test_there_are_demos():
    assert len(DEMOS) >= 10


@pytest.mark.parametrize("demo", DEMOS, ids=[demo.stem for demo in DEMOS])
def test_help_exits_at_once(demo, tmp_path):
    """`python demos/X.py --help` from an empty folder: exit 0, "usage:", the docstring's first
    line as the description, nothing written (no runs/ or reports/), within the hang guard."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(demo), "--help"], cwd=tmp_path, check=False,
                            capture_output=True, text=True, timeout=HANG_GUARD_S,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:"), result.stdout[:200]
    first_line = demo.read_text().split('"""')[1].strip().splitlines()[0]
    assert first_line in result.stdout
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "--help wrote output"
    assert seconds < HANG_GUARD_S

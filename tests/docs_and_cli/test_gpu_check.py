"""bench/gpu_check.sh's CPU dry run: the script a CUDA machine will run, every phase on toy sizes,
so it runs unchanged on the first GPU it meets."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_phase(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "tests on cpu: ok" in summary, summary
    assert "scale bench on cpu: ok" in summary, summary
    assert "torch" in (out / "env.txt").read_text()
    rows = json.loads((out / "scale.json").read_text())["rows"]
    assert rows and all(row["ours"]["step_ms"] > 0 for row in rows)


def test_gpu_check_refuses_an_unknown_argument():
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--bogus"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--bogus" in done.stderr

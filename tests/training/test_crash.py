"""kill -9 of a two-trainer trainSAE run (tests/crash_child.py) at random moments and inside file
writes: every file under its final name loads, and resuming ends bit-identical to an uninterrupted
run, every saved file compared (weights, intermediate saves, the checkpoint's weights and optimizer
state, config.json)."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .. import crash_child

CHILD = Path(__file__).parents[1] / "crash_child.py"


pytestmark = pytest.mark.slow  # each case runs and kills training processes


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's folder."""
    folder = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    try:
        crash_child.run(folder)
    finally:
        torch.set_num_threads(threads)
    return folder


def load_any(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)


def assert_identical(a, b, where):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def saved_files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def check_loadable(folder: Path) -> None:
    """Every file under its final name loads (none is half-written); leftovers are only hidden
    temporaries."""
    for name, path in saved_files(folder).items():
        if any(part.startswith(".") for part in Path(name).parts):
            # a killed process's temporary file or staging folder, removed by the next write
            continue
        load_any(path)


def kill_and_resume(folder: Path, mode: str, arg: str, kill_after: float | None = None) -> int:
    child = subprocess.Popen([sys.executable, str(CHILD), str(folder), mode, arg],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "started"
    if kill_after is not None:
        time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
    code = child.wait(timeout=120)
    check_loadable(folder)
    resume(folder)
    return code


def resume(folder: Path) -> None:
    threads = torch.get_num_threads()
    try:
        crash_child.run(folder, resume=True)
    finally:
        torch.set_num_threads(threads)


def assert_same_run(folder: Path, reference: Path) -> None:
    ours, theirs = saved_files(folder), saved_files(reference)
    ours = {name: path for name, path in ours.items()
            if not any(p.startswith(".") for p in Path(name).parts)}
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert_identical(load_any(ours[name]), load_any(theirs[name]), name)


# a run's 21 renames: checkpoint.pt every 5 steps (1, 2, 5-8, 11-15), both trainers' intermediate
# saves at steps 12 (3, 4) and 30 (9, 10), then each trainer's final folder (16-18, 19-21: ae.pt,
# model.safetensors, config.json)
@pytest.mark.parametrize("rename", [1, 4, 5, 10, 15, 17, 20])
def test_killed_inside_a_write_resumes_bit_identical(tmp_path, reference, rename):
    code = kill_and_resume(tmp_path, "rename", str(rename))
    assert code == -signal.SIGKILL, "the child was meant to die at that rename"
    assert_same_run(tmp_path, reference)


def test_killed_at_random_moments_resumes_bit_identical(tmp_path, reference):
    """Three runs killed at random moments, one of them killed again after its resume started
    (a chain)."""
    rng = random.Random(0)
    for run in range(3):
        folder = tmp_path / f"run{run}"
        kill_and_resume(folder, "sleep", "0.02", kill_after=rng.uniform(0.05, 2.5))
        assert_same_run(folder, reference)
    folder = tmp_path / "chain"
    for _ in range(2):  # kill, then start again (resuming) and kill again, then resume to the end
        child = subprocess.Popen([sys.executable, str(CHILD), str(folder), "sleep", "0.02"],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "started"
        time.sleep(rng.uniform(0.2, 0.8))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=120)
    check_loadable(folder)
    resume(folder)
    assert_same_run(folder, reference)

"""torch.distributed training on the CPU with the gloo backend and 2 processes (launched
by torchrun): data-parallel training equals one process on the same global batches (weights,
dead-feature statistics, normalisation), resumes exactly, and sharding trainers over ranks equals
training them all in one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dictionary_learning.training import shard, trainSAE
from dictionary_learning.training.loop import load_checkpoint
from dictionary_learning.utils import load_dictionary

from ..distributed_child import STEPS, configs, global_batches, other_configs

CHILD = Path(__file__).parents[1] / "distributed_child.py"


def torchrun(*args, world_size=2, expect_failure=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(CHILD.parent.parent)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={world_size}", str(CHILD), *map(str, args)],
                            env=env, capture_output=True, text=True, timeout=300)
    if expect_failure:
        assert result.returncode != 0
        return result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process on the global batches: the reference, with one thread as each rank has (a GEMM's
    summation order, hence its last bits, depends on the thread count)."""
    save_dir = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainSAE(iter(global_batches()), configs(), STEPS, save_dir=save_dir,
                 normalize_activations="unit", normalization_batches=2, checkpoint_steps=3,
                 progress=False, keep_checkpoint=True)
    finally:
        torch.set_num_threads(threads)
    return save_dir


def assert_same_dictionaries(a: Path, b: Path, indices, exact=False):
    for i in indices:
        ae_a, config_a = load_dictionary(a / f"trainer_{i}")
        ae_b, config_b = load_dictionary(b / f"trainer_{i}")
        assert (config_a["trainer"]["normalization_scales"]
                == pytest.approx(config_b["trainer"]["normalization_scales"], rel=1e-6))
        for key, value in ae_a.state_dict().items():
            if exact:
                assert torch.equal(ae_b.state_dict()[key], value), (i, key)
            else:
                torch.testing.assert_close(ae_b.state_dict()[key], value, rtol=1e-4, atol=1e-5,
                                           msg=f"{i} {key}")


@pytest.mark.slow
def test_data_parallel_equals_one_process(single, tmp_path):
    torchrun("data", tmp_path, STEPS)
    assert_same_dictionaries(single, tmp_path, range(3))
    ours, reference = (load_checkpoint(tmp_path / "checkpoint.pt"),
                       load_checkpoint(single / "checkpoint.pt"))
    assert ours["step"] == reference["step"] == STEPS
    # dead-feature statistics over global batches
    for mine, theirs in zip(ours["trainers"], reference["trainers"]):
        assert torch.equal(mine["num_tokens_since_fired"], theirs["num_tokens_since_fired"])
    dead = load_checkpoint(single / "checkpoint.pt")["trainers"][0]["num_tokens_since_fired"] >= 128
    assert dead.any(), "the test should exercise AuxK: some latents must be dead"
    assert not list(tmp_path.glob("checkpoint.rank*")), ("data-parallel training writes one "
                                                         "checkpoint")


@pytest.mark.slow
def test_data_parallel_resume(single, tmp_path):
    torchrun("data", tmp_path, 7)  # stopped at step 7 (configs still say 16 steps)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 7
    torchrun("data", tmp_path, STEPS, "resume")
    assert_same_dictionaries(single, tmp_path, range(3))


@pytest.mark.slow
def test_trainers_sharded_over_ranks(single, tmp_path):
    torchrun("trainers", tmp_path, STEPS)
    assert_same_dictionaries(single, tmp_path, range(3), exact=True)
    assert sorted(p.name for p in tmp_path.glob("checkpoint.rank*")) == ["checkpoint.rank0.pt",
                                                                         "checkpoint.rank1.pt"]
    # trainers 0 and 2
    assert len(load_checkpoint(tmp_path / "checkpoint.rank0.pt")["trainers"]) == 2
    assert len(load_checkpoint(tmp_path / "checkpoint.rank1.pt")["trainers"]) == 1  # trainer 1


@pytest.mark.slow
def test_data_parallel_other_trainers(tmp_path):
    """JumpReLU (its L0 penalty on the global batch's L0), BatchTopK and Matryoshka (the global
    batch's top k * batch codes, gathered over ranks) equal one process on the global batches
    too."""
    torchrun("data-other", tmp_path, STEPS)
    reference = tmp_path / "single"
    trainSAE(iter(global_batches()), other_configs(), STEPS, save_dir=reference,
             normalize_activations="unit", normalization_batches=2, checkpoint_steps=3,
             progress=False, keep_checkpoint=True)
    assert_same_dictionaries(reference, tmp_path, range(3))
    for i in (1, 2):
        # the thresholds were learned
        assert float(load_dictionary(tmp_path / f"trainer_{i}")[0].threshold) > 0


def test_shard_and_mode_errors():
    assert list(shard(range(7), 1, 3)) == [1, 4]
    with pytest.raises(ValueError, match="rank must be in"):
        shard(range(3), 3, 3)
    with pytest.raises(ValueError, match="needs a torch.distributed process group"):
        trainSAE(iter(global_batches()), configs(), 2, distributed="data", progress=False)
    with pytest.raises(ValueError, match="distributed must be None, 'data' or 'trainers'"):
        trainSAE(iter(global_batches()), configs(), 2, distributed="model", progress=False)


@pytest.mark.slow
def test_ranks_given_different_configs_refuse_to_start(tmp_path):
    """Rank 1 was given another lr: the data-parallel run stops before any step, naming why, and
    writes nothing."""
    output = torchrun("data-mismatch", tmp_path, STEPS, expect_failure=True)
    assert "the trainer configs differ between ranks" in output
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.safetensors"))

"""Resumable checkpoints: every trainer's state in one atomically written file (a crash or a full
disk while writing leaves the previous complete checkpoint, from which a resume ends bit-identical),
and loading never unpickles code."""

import pytest
import torch

from dictionary_learning.training import loop, trainSAE

from ..helpers import RunsCode, planted_features, planted_stream
from .test_training import N_TRUE, D, K, topk_config


def test_a_crafted_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"trainers": [RunsCode(marker)], "step": 3, "batches_consumed": 3},
               tmp_path / "checkpoint.pt")
    features = planted_features(N_TRUE, D, seed=0)
    with pytest.raises(ValueError, match="could run code"):
        trainSAE(planted_stream(features, K, 32, 10, seed=1), [topk_config(10)], 10,
                 save_dir=tmp_path, resume=True, progress=False)
    assert not marker.exists()


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(tmp_path,
                                                                              monkeypatch):
    """Two trainers; the third checkpoint write dies half-way (a full disk): checkpoint.pt still
    holds the second, complete for both trainers, and resuming from it ends bit-identical to an
    uninterrupted run."""
    features = planted_features(N_TRUE, D, seed=0)
    configs = [topk_config(20, dead_feature_threshold=300), topk_config(20, seed=3, k=4)]
    straight = trainSAE(planted_stream(features, K, 32, 30, seed=4), configs, 20, progress=False)

    real_atomic_write, writes = loop.atomic_write, []

    def full_disk(path, write):
        writes.append(path)
        if len(writes) == 3:
            write(str(path) + ".tmp")  # the bytes go out, then the disk fills before the rename
            raise OSError(28, "No space left on device")
        return real_atomic_write(path, write)

    monkeypatch.setattr(loop, "atomic_write", full_disk)
    with pytest.raises(OSError, match="No space"):
        trainSAE(planted_stream(features, K, 32, 30, seed=4), configs, 20, save_dir=tmp_path,
                 checkpoint_steps=5, progress=False)
    monkeypatch.setattr(loop, "atomic_write", real_atomic_write)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 10 and len(state["trainers"]) == 2
    resumed = trainSAE(planted_stream(features, K, 32, 30, seed=4), configs, 20, save_dir=tmp_path,
                       resume=True, progress=False)
    for a, b in zip(straight, resumed):
        for (name, x), y in zip(a.ae.state_dict().items(), b.ae.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_resuming_with_another_configuration_is_refused(tmp_path):
    """The checkpoint's optimizer would keep the old lr while config.json recorded the new one."""
    features = planted_features(N_TRUE, D, seed=0)
    trainSAE(planted_stream(features, K, 32, 10, seed=1), [topk_config(10)], 10, save_dir=tmp_path,
             checkpoint_steps=5, progress=False, keep_checkpoint=True)
    with pytest.raises(ValueError, match=r"lr: 0.002 in the checkpoint, 0.001 now"):
        trainSAE(planted_stream(features, K, 32, 10, seed=1), [topk_config(10, lr=1e-3)], 10,
                 save_dir=tmp_path, resume=True, progress=False)


def test_a_finished_run_leaves_no_checkpoint_unless_asked(tmp_path):
    """The checkpoint (every trainer's optimizer state) is deleted once the dictionaries are saved;
    keep_checkpoint keeps it, and resuming a finished run from it trains nothing more."""
    features = planted_features(N_TRUE, D, seed=0)
    trainSAE(planted_stream(features, K, 32, 6, seed=1), [topk_config(6)], 6,
             save_dir=tmp_path / "a", checkpoint_steps=2, progress=False)
    assert (not (tmp_path / "a" / "checkpoint.pt").exists()
            and (tmp_path / "a" / "trainer_0" / "ae.pt").exists())
    kept = trainSAE(planted_stream(features, K, 32, 6, seed=1), [topk_config(6)], 6,
                    save_dir=tmp_path / "b", checkpoint_steps=2, progress=False,
                    keep_checkpoint=True)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 6
    again = trainSAE(planted_stream(features, K, 32, 6, seed=1), [topk_config(6)], 6,
                     save_dir=tmp_path / "b", resume=True, progress=False, keep_checkpoint=True)
    for (name, x), y in zip(kept[0].ae.state_dict().items(), again[0].ae.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)

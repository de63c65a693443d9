"""trainSAE on dict batches (many hook points from one pass): each trainer trains on the entry its
config's submodule_name names, exactly as it would on a stream of that entry alone; train_suite
builds a suite's modules from one buffer and equals training each module on its own buffer."""

import pytest
import torch

from dictionary_learning import ActivationBuffer
from dictionary_learning.scae import SCAESuite, suite_hook_points, train_suite
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary

from ..helpers import random_texts

D = 16


def config(name, transcoder=False, seed=0, steps=12):
    return dict(trainer=TopKTrainer, activation_dim=D, dict_size=64, k=4, steps=steps,
                warmup_steps=2, seed=seed, device="cpu", transcoder=transcoder, submodule_name=name)


def dict_batches(n=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(32, D, generator=generator) * 3
        batches.append({"a": torch.randn(32, D, generator=generator), "unused": x,
                        "t": (x, torch.randn(32, D, generator=generator) + 1)})
    return batches


@pytest.mark.parametrize("normalize", [False, "d_model"])
def test_routing_equals_separate_streams(tmp_path, normalize):
    batches = dict_batches()
    together = trainSAE(iter(batches), [config("t", transcoder=True, seed=1), config("a", seed=2)],
                        12, normalize_activations=normalize, save_dir=tmp_path / "together",
                        progress=False)
    for i, (name, transcoder, seed) in enumerate([("t", True, 1), ("a", False, 2)]):
        alone = trainSAE(iter([b[name] for b in batches]), [config(name, transcoder, seed)], 12,
                         normalize_activations=normalize, save_dir=tmp_path / name, progress=False)
        assert together[i].normalization_scales == alone[0].normalization_scales
        for key, value in alone[0].ae.state_dict().items():
            assert torch.equal(together[i].ae.state_dict()[key], value), (name, key)
        saved, _ = load_dictionary(tmp_path / "together" / f"trainer_{i}")
        reference, _ = load_dictionary(tmp_path / name / "trainer_0")
        for key, value in reference.state_dict().items():
            assert torch.equal(saved.state_dict()[key], value), (name, key)
    if normalize:  # each entry has its own factor
        assert together[0].normalization_scales != together[1].normalization_scales


def test_routing_resume_is_exact(tmp_path):
    batches = dict_batches()
    configs = [config("t", transcoder=True, seed=1), config("a", seed=2)]
    full = trainSAE(iter(batches), configs, 12, normalize_activations="unit", progress=False)
    trainSAE(iter(batches), [dict(c, steps=12) for c in configs], 5, normalize_activations="unit",
             save_dir=tmp_path, progress=False)  # stopped early at step 5 (its checkpoint)
    resumed = trainSAE(iter(batches), configs, 12, normalize_activations="unit", save_dir=tmp_path,
                       resume=True, progress=False)
    for a, b in zip(full, resumed):
        assert a.normalization_scales == b.normalization_scales
        for key, value in a.ae.state_dict().items():
            assert torch.equal(b.ae.state_dict()[key], value), key


@pytest.mark.parametrize("configs,message", [
    ([config(None)], "has no submodule_name"),
    ([config("a"), config("nope")], "submodule_name='nope' is not one of"),
])
def test_routing_errors(configs, message):
    with pytest.raises(ValueError, match=message):
        trainSAE(iter(dict_batches(3)), configs, 3, progress=False)


def test_routing_checked_before_any_step(tiny_llama):
    buffer = ActivationBuffer(random_texts(4), tiny_llama, suite_hook_points(tiny_llama, 1),
                              n_ctxs=2, ctx_len=8)
    with pytest.raises(ValueError, match="submodule_name='attn_5' is not one of the hook points "
                                         "the data yields: "
                                         r"\['attn_0', 'mlp_0'\]"):
        trainSAE(buffer, [dict(config("attn_5"), activation_dim=64)], 3, progress=False)


def test_train_suite_equals_one_buffer_per_module(tiny_llama, tmp_path):
    texts = random_texts(40, seed=6)
    options = dict(n_ctxs=8, ctx_len=16, refresh_batch_size=8, out_batch_size=48, seed=3)
    suite = train_suite(tiny_llama, 2, 128, 4, texts, 6, save_dir=tmp_path, progress=False,
                        normalization_batches=2, **options)
    assert isinstance(suite, SCAESuite) and suite.names == ["attn_0", "mlp_0", "attn_1", "mlp_1"]
    assert SCAESuite.load(tmp_path / "suite").names == suite.names
    points = suite_hook_points(tiny_llama, 2)
    for i, name in enumerate(suite.names):
        mlp = name.startswith("mlp")
        buffer = ActivationBuffer(texts, tiny_llama, points[name], io="in_to_out" if mlp else "out",
                                  **options)
        configs = [dict(trainer=TopKTrainer, activation_dim=64, dict_size=128, k=4, steps=6,
                        warmup_steps=1, seed=3 + i, device="cpu", transcoder=mlp,
                        dead_feature_threshold=1_000_000)]
        trainSAE(buffer, configs, 6, normalize_activations="d_model", normalization_batches=2,
                 save_dir=tmp_path / "alone" / name, progress=False)
        alone, _ = load_dictionary(tmp_path / "alone" / name / "trainer_0")
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(suite[name].state_dict()[key], value, rtol=1e-5, atol=1e-6,
                                       msg=name)

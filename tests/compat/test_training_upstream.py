"""trainSAE as upstream users call it: upstream's parameters (normalisation to unit mean squared
norm, int and list save_steps writing checkpoints/ae_N.pt, backup_steps, activations_split_by_head),
its helpers (get_norm_factor, log_stats), the founding README's call form, and upstream's loading
calls (from_pretrained(path, k=, device=))."""

import math

import pytest
import torch

from dictionary_learning.dictionary import AutoEncoder, AutoEncoderTopK
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import get_norm_factor, log_stats, trainSAE
from dictionary_learning.utils import load_dictionary

from ..helpers import planted_features, planted_stream

D, N_TRUE, K = 32, 128, 3


def topk_config(steps, **overrides):
    config = dict(trainer=TopKTrainer, dict_class=AutoEncoderTopK, activation_dim=D,
                  dict_size=2 * N_TRUE, k=K, lr=2e-3, steps=steps, warmup_steps=5, seed=0, layer=0,
                  lm_name="planted")
    config.update(overrides)
    return config


def test_get_norm_factor_is_the_root_mean_squared_norm():
    batches = [torch.randn(16, D) * (i + 1) for i in range(5)]
    # upstream's definition: the mean over the first steps + 1 batches of each batch's mean squared
    # norm, rooted
    expected = math.sqrt(sum(b.pow(2).sum(-1).mean().item() for b in batches[:4]) / 4)
    assert get_norm_factor(iter(batches), steps=3) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("target, expected_mean_squared_norm", [(True, 1.0), ("d_model", D)])
def test_normalize_activations_targets(tmp_path, target, expected_mean_squared_norm):
    features = planted_features(N_TRUE, D, seed=0)
    batches = [x * 5.0 for x in planted_stream(features, K, 64, 30, seed=1)]
    trainSAE(iter(batches), [topk_config(10)], 10, save_dir=tmp_path, normalize_activations=target,
             normalization_batches=4, progress=False)
    _, config = load_dictionary(tmp_path / "trainer_0")
    scale = config["trainer"]["normalization_scales"][0]
    mean_squared = sum(b.pow(2).sum(-1).mean().item() for b in batches[:4]) / 4
    assert scale**2 * mean_squared == pytest.approx(expected_mean_squared_norm, rel=1e-5)
    assert config["trainer"]["norm_factor"] == pytest.approx(1 / scale)


@pytest.mark.parametrize("save_steps", [[0, 4, 7], 4])
def test_save_steps_write_upstream_checkpoints(tmp_path, save_steps):
    features = planted_features(N_TRUE, D, seed=0)
    trainSAE(planted_stream(features, K, 64, 12, seed=2), [topk_config(12)], 12,
             save_steps=save_steps, save_dir=tmp_path, progress=False)
    names = sorted(p.name for p in (tmp_path / "trainer_0" / "checkpoints").iterdir())
    expected = {"ae_0.pt", "ae_4.pt", "ae_7.pt"} if isinstance(save_steps, list) else {"ae_4.pt",
                                                                                       "ae_8.pt",
                                                                                       "ae_12.pt"}
    assert set(names) == expected
    # ae_4.pt holds the weights after 4 steps: those of a run of the same configuration stopped
    # there
    [short] = trainSAE(planted_stream(features, K, 64, 12, seed=2), [topk_config(12)], 4,
                       progress=False)
    loaded = AutoEncoderTopK.from_pretrained(tmp_path / "trainer_0" / "checkpoints" / "ae_4.pt",
                                             k=K, device="cpu")
    for name, value in short.ae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_backup_steps_write_a_resumable_checkpoint(tmp_path):
    features = planted_features(N_TRUE, D, seed=0)
    trainSAE(planted_stream(features, K, 64, 12, seed=2), [topk_config(12)], 12, save_dir=tmp_path,
             backup_steps=3, progress=False, keep_checkpoint=True)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 12


def test_activations_split_by_head_trains_trainer_i_on_head_i():
    features = planted_features(N_TRUE, D, seed=0)
    heads = [list(planted_stream(features, K, 32, 8, seed=s)) for s in (3, 4)]
    stacked = [torch.stack([a, b], dim=1) for a, b in zip(*heads)]  # [batch, n_heads=2, d_head]
    configs = [topk_config(8, seed=0), topk_config(8, seed=1)]
    together = trainSAE(iter(stacked), configs, 8, activations_split_by_head=True, progress=False)
    for head, config, trainer in zip(heads, configs, together):
        [alone] = trainSAE(iter(head), [config], 8, progress=False)
        for name, value in alone.ae.state_dict().items():
            torch.testing.assert_close(trainer.ae.state_dict()[name], value, rtol=0, atol=0,
                                       msg=name)


def test_log_stats_reports_l0_and_variance_explained():
    features = planted_features(N_TRUE, D, seed=0)
    batches = list(planted_stream(features, K, 64, 6, seed=5))
    [trainer] = trainSAE(iter(batches), [topk_config(5)], 5, progress=False)
    before = trainer.num_tokens_since_fired.clone()
    queue = __import__("queue").Queue()
    [log] = log_stats([trainer], 5, batches[5], False, False, log_queues=[queue])
    assert queue.get_nowait() == log
    x = batches[5]
    with torch.no_grad():
        x_hat, f = trainer.ae(x, output_features=True)
    assert log["l0"] == pytest.approx((f != 0).float().sum(-1).mean().item())
    fve = 1 - (x - x_hat).var(0).sum() / x.var(0).sum()
    assert log["frac_variance_explained"] == pytest.approx(fve.item(), rel=1e-5)
    # logging leaves dead-feature counts alone
    assert torch.equal(trainer.num_tokens_since_fired, before)


def test_from_pretrained_takes_upstreams_k_and_device(tmp_path):
    ae = AutoEncoderTopK(8, 32, 4)
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    loaded = AutoEncoderTopK.from_pretrained(tmp_path / "ae.pt", k=4, device="cpu")
    assert int(loaded.k) == 4 and torch.equal(loaded.encoder.weight, ae.encoder.weight)
    with pytest.raises(ValueError, match="k=5"):
        AutoEncoderTopK.from_pretrained(tmp_path / "ae.pt", k=5, device="cpu")
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in ae.state_dict().items()},
               tmp_path / "bf16.pt")
    # as upstream: the module's float32 unless a dtype is asked for
    assert (AutoEncoderTopK.from_pretrained(tmp_path / "bf16.pt").encoder.weight.dtype
            == torch.float32)
    bf16 = AutoEncoderTopK.from_pretrained(tmp_path / "bf16.pt", dtype=torch.bfloat16)
    assert bf16.encoder.weight.dtype == torch.bfloat16


def test_square_transcoder_files_are_marked(tmp_path):
    """A square transcoder's weights look like an SAE's: the file carries `is_transcoder`, which
    this toolkit reads and upstream's strict `load_state_dict` rejects (checked against upstream
    itself in test_upstream_files.py)."""
    from dictionary_learning.utils import save_dictionary

    transcoder = AutoEncoderTopK(8, 32, 4, transcoder=True)
    save_dictionary(transcoder, tmp_path)
    state = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert bool(state["is_transcoder"])
    with pytest.raises(RuntimeError, match="is_transcoder"):
        # what upstream's from_pretrained does with it
        AutoEncoderTopK(8, 32, 4).load_state_dict(state)
    loaded = AutoEncoderTopK.from_pretrained(tmp_path / "ae.pt")
    x = torch.randn(5, 8)
    assert loaded.transcoder and torch.allclose(loaded(x), transcoder(x))


def test_founding_readme_call_form(tmp_path):
    """`trainSAE(buffer, activation_dim, dictionary_size, lr=, sparsity_penalty=, device=)` returns
    an AutoEncoder with unit-norm decoder columns, trained until the data runs out."""
    features = planted_features(N_TRUE, D, seed=0)
    ae = trainSAE(planted_stream(features, K, 64, 30, seed=6), D, 2 * N_TRUE, lr=3e-3,
                  sparsity_penalty=1e-3, device="cpu", warmup_steps=5, resample_steps=10,
                  log_steps=None, save_steps=10, save_dir=tmp_path, progress=False)
    assert isinstance(ae, AutoEncoder)
    torch.testing.assert_close(ae.decoder.weight.norm(dim=0), torch.ones(2 * N_TRUE), atol=1e-5,
                               rtol=0)
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"ae_10.pt", "ae_20.pt",
                                                                      "ae_30.pt"}
    loaded, _ = load_dictionary(tmp_path)
    x = next(planted_stream(features, K, 16, 1, seed=7))
    torch.testing.assert_close(loaded(x), ae(x), atol=1e-5, rtol=1e-5)
    entropy_ae = trainSAE(planted_stream(features, K, 64, 10, seed=6), D, 2 * N_TRUE, lr=3e-3,
                          sparsity_penalty=1e-3, entropy=True, log_steps=None, progress=False)
    assert isinstance(entropy_ae, AutoEncoder)


def test_topk_trainer_upstream_methods():
    trainer = TopKTrainer(steps=20, activation_dim=16, dict_size=64, k=4, seed=0, k_anneal_steps=10,
                          dead_feature_threshold=50)
    assert int(trainer.ae.k) == 16  # k anneals from the input width ...
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    for step in range(5):
        trainer.update(step, x)
    # ... linearly (step 5 uses k(4), as upstream) ...
    assert int(trainer.ae.k) == int(16 * 0.6 + 4 * 0.4)
    for step in range(5, 12):
        trainer.update(step, x)
    assert int(trainer.ae.k) == 4  # ... to k at k_anneal_steps
    # upstream's threshold update: the mean over tokens of each token's smallest positive kept code
    trainer.ae.threshold.fill_(-1.0)
    top = torch.tensor([[3.0, 1.0, 0.0], [2.0, 5.0, 4.0]])
    trainer.update_threshold(top)
    assert float(trainer.ae.threshold) == pytest.approx((1.0 + 2.0) / 2)
    # a token that kept no positive code is left out (upstream's +inf would set the threshold to inf
    # for good)
    trainer.ae.threshold.fill_(-1.0)
    trainer.update_threshold(torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 5.0, 4.0]]))
    assert float(trainer.ae.threshold) == pytest.approx((1.0 + 2.0) / 2)
    trainer.update_threshold(torch.zeros(2, 3))  # nothing positive: unchanged
    assert float(trainer.ae.threshold) == pytest.approx((1.0 + 2.0) / 2)
    # logging=True returns upstream's LossLog and leaves the dead-feature counts alone
    before = trainer.num_tokens_since_fired.clone()
    x_in, x_hat, f, losses = trainer.loss(x, step=12, logging=True)
    assert torch.equal(trainer.num_tokens_since_fired, before)
    torch.testing.assert_close(x_hat, trainer.ae(x))
    assert "l2_loss" in losses and f.shape == (32, 64)
    # upstream's dense AuxK equals the sparse one the step computes
    trainer.num_tokens_since_fired[:20] = 1000
    out = trainer.step_loss(x, x, 13)
    trainer.dead.update(out.fired, x.shape[0])  # upstream counts the batch before its AuxK
    with torch.no_grad():
        post_relu = torch.relu(trainer.ae.pre_activations(x))
        residual = x - trainer.ae(x)
    dense = trainer.get_auxiliary_loss(residual, post_relu)
    assert float(dense.detach()) == pytest.approx(out.metrics["auxk_loss"], rel=1e-4)

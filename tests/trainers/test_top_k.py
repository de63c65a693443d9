"""TopKTrainer's update: AuxK's dead rows take their gradients outside autograd inside `update`
(`parts.RowGradients`, no dense [d_sae, d] gradient per parameter); the steps must equal those of
plain autograd."""

import pytest
import torch

from dictionary_learning.trainers import (
    BatchTopKTrainer,
    MatryoshkaBatchTopKTrainer,
    TopKTrainer,
    parts,
)


def _pair(cls, dense_share, monkeypatch, **options):
    monkeypatch.setattr(parts, "DENSE_AUXK_SHARE", dense_share)
    trainers = []
    for _ in range(2):
        trainer = cls(steps=50, activation_dim=10, dict_size=60, k=3, k_aux=5, auxk_alpha=0.5,
                      warmup_steps=0, seed=0, dead_feature_threshold=100, device="cpu", lr=1e-2,
                      **options)
        trainer.ae.double()
        dead = torch.arange(0, 60, 3)  # a third count as dead, and rarely fire
        trainer.dead.counts[dead] = 1000
        with torch.no_grad():
            trainer.ae._encoder_affine()[1][dead] -= 1.5
        trainers.append(trainer)
    plain = trainers[1]
    step_loss = plain.step_loss

    def through_autograd(x, y, step):  # the same step with AuxK in autograd's graph
        plain.in_update = False
        return step_loss(x, y, step)

    plain.step_loss = through_autograd
    return trainers


@pytest.mark.parametrize("dense_share", [0.0, 1e9], ids=["dense_over_dead", "sparse"])
@pytest.mark.parametrize("cls, options", [
    (TopKTrainer, {}), (BatchTopKTrainer, {}),
    (MatryoshkaBatchTopKTrainer, {"group_fractions": [0.5, 0.5]}),
    (TopKTrainer, {"output_dim": 7}),
], ids=["topk", "batchtopk", "matryoshka", "transcoder"])
def test_update_with_row_gradients_equals_autograd(cls, options, dense_share, monkeypatch):
    ours, plain = _pair(cls, dense_share, monkeypatch, **options)
    generator = torch.Generator().manual_seed(3)
    for step in range(4):
        x = torch.randn(16, 10, generator=generator, dtype=torch.float64)
        batch = (x, torch.randn(16, 7, generator=generator, dtype=torch.float64)) \
            if "output_dim" in options else x
        ours.update(step, batch)
        plain.update(step, batch)
        assert ours.pre_norm_auxk_loss > 0  # AuxK ran
    for (name, mine), theirs in zip(ours.ae.named_parameters(), plain.ae.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("cls, options", [
    (BatchTopKTrainer, {}),
    (MatryoshkaBatchTopKTrainer, {"group_fractions": [0.5, 0.5]}),
])
def test_token_topk_steps_select_per_token_then_per_batch(cls, options):
    """Before token_topk_steps each row keeps its own k largest pre-activations (checked against a
    dense topk); from then on the batch's k * batch largest, which give rows different counts."""
    trainer = cls(steps=10, activation_dim=8, dict_size=40, k=3, seed=0, device="cpu",
                  token_topk_steps=4, **options)
    x = torch.randn(32, 8) * torch.linspace(0.1, 3, 32)[:, None]  # unequal norms
    pre = trainer.ae.pre_activations(x)
    for step, per_token in ((0, True), (3, True), (4, False)):
        code = trainer.select(x, pre, step)
        counts = torch.bincount(code.rows, minlength=32)
        if per_token:
            assert (counts == 3).all()
            expected = pre.topk(3, dim=-1).indices.sort(dim=-1).values
            got = code.cols.reshape(32, 3).sort(dim=-1).values
            assert torch.equal(got, expected)
            torch.testing.assert_close(code.values.reshape(32, 3).sort(dim=-1).values,
                                       pre.topk(3, dim=-1).values.relu().sort(dim=-1).values)
        else:
            assert counts.sum() <= 3 * 32 and len(set(counts.tolist())) > 1
    with pytest.raises(ValueError, match="token_topk_steps"):
        cls(steps=10, activation_dim=8, dict_size=40, k=3, token_topk_steps=11, **options)


def test_a_short_run_learns_a_threshold_that_gives_k_codes():
    """threshold_beta None scales the moving average to the run (upstream's 0.999 from 10,000
    steps): after 400 BatchTopK steps the inference threshold keeps about k codes per token,
    where 0.999 still remembers the first steps' larger codes and keeps about three times k."""
    from dictionary_learning.dictionary import BatchTopKSAE
    from dictionary_learning.trainers.top_k import TopKConfig
    from dictionary_learning.training import trainSAE

    from ..helpers import planted_features, planted_stream

    assert TopKConfig(activation_dim=4, dict_size=8, k=2, steps=600).threshold_beta == 1 - 1 / 60
    assert TopKConfig(activation_dim=4, dict_size=8, k=2, steps=50_000).threshold_beta == 0.999
    features, steps, k = planted_features(128, 32, seed=0), 400, 3
    l0 = {}
    for beta in (None, 0.999):
        config = dict(trainer=BatchTopKTrainer, dict_class=BatchTopKSAE, activation_dim=32,
                      dict_size=256, k=k, lr=2e-3, steps=steps, warmup_steps=20, seed=0,
                      token_topk_steps=steps // 2, threshold_beta=beta)
        [trainer] = trainSAE(planted_stream(features, k, 256, steps, seed=1), [config], steps,
                             progress=False)
        x = next(planted_stream(features, k, 2048, 1, seed=9))
        l0[beta] = float((trainer.ae.encode(x) > 0).sum(-1).float().mean())
    assert abs(l0[None] - k) < 0.2 * k, l0
    assert l0[0.999] > 2 * k, l0


@pytest.mark.parametrize("cls, options", [
    (TopKTrainer, {}), (BatchTopKTrainer, {}),
    (MatryoshkaBatchTopKTrainer, {"group_fractions": [0.5, 0.5]}),
], ids=["topk", "batchtopk", "matryoshka"])
def test_a_transcoder_starts_with_centred_pre_activations(cls, options):
    """A transcoder's encoder reads x uncentred: before its first step the encoder bias is set so
    that each latent's pre-activation averages zero over the batch (float64 reference; else the
    latents facing away from the inputs' mean start dead), and b_dec sits at the targets'
    geometric median."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=generator) + 8 * torch.randn(16, generator=generator)
    y = torch.tanh(x) @ torch.randn(16, 12, generator=generator)
    trainer = cls(steps=150, activation_dim=16, dict_size=128, k=4, output_dim=12, seed=0,
                  device="cpu", **options)
    weight, bias, _ = trainer.ae._encoder_affine()
    before = x.double() @ weight.double().t() + bias.double()
    assert before.mean(0).abs().max() > 0.5 * before.abs().mean()  # not centred at the start
    trainer.before_step(0, x, y)
    after = x.double() @ weight.double().t() + bias.double()
    assert after.mean(0).abs().max() < 1e-4 * after.abs().mean()
    torch.testing.assert_close(trainer.ae.b_dec, parts.geometric_median(y))

"""The bfloat16 encoder path (`encoder_dtype`): the dense encoder GEMM in bfloat16 only chooses the
active latents; their values and every gradient are exact in float32 (against a float64 reference),
selection differs from float32's only at near-ties, and training recovers a planted dictionary as
well as float32 does. Also the sampled product behind it and the dense AuxK path."""

import pytest
import torch

from dictionary_learning.sparse import gather_linear, sampled_linear
from dictionary_learning.trainers import BatchTopKTrainer, MatryoshkaBatchTopKTrainer, TopKTrainer
from dictionary_learning.trainers.top_k import resolve_encoder_dtype
from dictionary_learning.training import trainSAE

from ..helpers import fraction_recovered, planted_features, planted_stream

D, N_TRUE, K = 32, 128, 3


def test_sampled_linear_against_float64():
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(50, 24, generator=generator),
                       torch.randn(70, 24, generator=generator),
                       torch.randn(70, generator=generator))
    # unsorted in each row
    cols = torch.randn(50, 70, generator=generator).topk(5, dim=-1, sorted=False).indices
    keep = torch.arange(50).repeat_interleave(5) % 7 != 3  # some rows empty
    rows, cols = torch.arange(50).repeat_interleave(5)[keep], cols.flatten()[keep]
    expected = (x.double()[rows] * weight.double()[cols]).sum(-1) + bias.double()[cols]
    torch.testing.assert_close(sampled_linear(x, weight, bias, rows, cols).double(), expected,
                               rtol=1e-5, atol=1e-5)
    # gather_linear recomputes bfloat16 values exactly, and its gradients are float32 autograd's
    values = (x @ weight.t() + bias)[rows, cols].bfloat16()
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = gather_linear(*leaves, rows, cols, values)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    reference = [t.double().clone().requires_grad_() for t in (x, weight, bias)]
    ((reference[0] @ reference[1].t() + reference[2])[rows, cols]).pow(2).sum().backward()
    for leaf, ref in zip(leaves, reference):
        torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trainer_class",
                         [TopKTrainer, BatchTopKTrainer, MatryoshkaBatchTopKTrainer])
def test_bfloat16_step_is_float32_step_up_to_near_ties(trainer_class):
    """Same start, same batch: the bfloat16 encoder GEMM chooses the float32 step's latents except
    at near-ties (a swapped latent's float32 pre-activation lies within bfloat16 rounding of the one
    it replaced), and the step's loss and weights stay within those ties' effect of the float32
    step's."""
    features = planted_features(N_TRUE, D, seed=0)
    batches = list(planted_stream(features, K, 256, 2, seed=2))
    options = dict(steps=10, activation_dim=D, dict_size=2 * N_TRUE, k=K, warmup_steps=0, seed=0,
                   device="cpu")
    if trainer_class is MatryoshkaBatchTopKTrainer:
        options["group_fractions"] = [0.25, 0.75]
    trainers = [trainer_class(**options, encoder_dtype=dtype) for dtype in (None, torch.bfloat16)]
    assert (trainers[1].config["encoder_dtype"] == "bfloat16"
            and trainers[0].config["encoder_dtype"] is None)
    for trainer in trainers:
        trainer.update(0, batches[0])  # b_dec at the batch's geometric median, one step
    ae = trainers[0].ae
    pre32, pre16 = ae.pre_activations(batches[1]), ae.pre_activations(batches[1], torch.bfloat16)
    assert pre16.dtype == torch.bfloat16
    top32, top16 = pre32.topk(K, dim=-1).indices, pre16.topk(K, dim=-1).indices
    # [batch] rows choosing the same latents
    same = (top32.sort(-1).values == top16.sort(-1).values).all(-1)
    assert same.float().mean() >= 0.95
    kth = pre32.gather(1, top32).min(-1).values  # float32's k-th value of each row
    swapped = pre32.gather(1, top16).min(-1).values  # the smallest float32 value bfloat16 chose
    # bfloat16's rounding of the GEMM's inputs and output
    tolerance = 2 ** -7 * pre32.abs().max(-1).values
    assert ((kth - swapped)[~same] <= tolerance[~same]).all()
    losses = [t.update(1, batches[1]) for t in trainers]
    # which of several bfloat16-equal values a batch top-k keeps is arbitrary (torch.topk's choice,
    # or sparse.largest's): over planted seeds 0-3 the loss moved 0.05-0.9% with either selection
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    # Adam moves a weight by about lr per step whatever its gradient: a latent chosen by one side
    # only can differ by that much after the two steps, and no weight by more
    lr = trainers[0].config["lr"]
    for (name, a), b in zip(trainers[0].ae.state_dict().items(),
                            trainers[1].ae.state_dict().values()):
        if a.is_floating_point() and a.numel() > 1:
            assert (b - a).abs().max() <= 2 * 2 * lr, name


@pytest.mark.slow
def test_bfloat16_encoder_recovers_planted_features():
    features = planted_features(N_TRUE, D, seed=0)
    steps = 1000
    config = dict(trainer=TopKTrainer, activation_dim=D, dict_size=2 * N_TRUE, k=K, lr=2e-3,
                  steps=steps, warmup_steps=20, seed=0, dead_feature_threshold=20_000,
                  encoder_dtype=torch.bfloat16)
    [trainer] = trainSAE(planted_stream(features, K, 256, steps, seed=1), [config], steps,
                         progress=False)
    assert fraction_recovered(features, trainer.ae.decoder.weight.detach()) >= 0.9
    assert trainer.last_metrics["fvu"] < 0.2


def test_dense_and_sparse_auxk_agree(monkeypatch):
    """AuxK over the dead columns densely (k_aux a large share of them) or sparsely: the same loss
    and gradients."""
    import dictionary_learning.trainers.parts as parts

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, D, generator=generator)
    results = []
    for share in (0.1, 1e9):  # dense here (k_aux = 16 of 40 dead), then forced sparse
        monkeypatch.setattr(parts, "DENSE_AUXK_SHARE", share)
        trainer = TopKTrainer(steps=10, activation_dim=D, dict_size=80, k=K, warmup_steps=0, seed=0,
                              device="cpu", dead_feature_threshold=1)
        trainer.num_tokens_since_fired[:40] = 10  # latents 0-39 count as dead
        trainer.update(0, x)
        results.append((trainer.last_metrics["auxk_loss"], trainer.ae.state_dict()))
    assert results[0][0] > 0 and results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_encoder_dtype_values():
    cpu = torch.device("cpu")
    assert (resolve_encoder_dtype(None, cpu) is None
            and resolve_encoder_dtype("bfloat16", cpu) == torch.bfloat16)
    assert resolve_encoder_dtype("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="encoder_dtype must be None, 'auto' or a floating dtype"):
        resolve_encoder_dtype("int8", cpu)

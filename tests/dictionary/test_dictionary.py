"""Dictionaries: the sparse TopK path (forward and every gradient) against a dense float64 autograd
reference."""

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning.dictionary import (
    AutoEncoder,
    AutoEncoderTopK,
    BatchTopKSAE,
    dictionary_from_config,
)


def _randomise(ae, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    return ae


def dense_topk_reference(ae, x):
    """Plain autograd: pre-activations, relu, top-k mask, dense decode."""
    enc_in = x if ae.transcoder else x - ae.b_dec
    pre = F.relu(enc_in @ ae.encoder.weight.t() + ae.encoder.bias)
    _, indices = pre.topk(int(ae.k), dim=-1)
    codes = pre * torch.zeros_like(pre).scatter(-1, indices, 1.0)
    out = codes @ ae.decoder.weight.t() + ae.b_dec
    return out + ae.skip(x) if ae.skip is not None else out


@pytest.mark.parametrize("kwargs", [dict(), dict(output_dim=7, transcoder=True),
                                    dict(transcoder=True, skip=True)])
def test_topk_sparse_path_matches_dense_autograd(kwargs):
    ae = _randomise(AutoEncoderTopK(12, 40, 5, **kwargs).double())
    x = torch.randn(9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.randn(9, ae.output_dim, dtype=torch.float64)
    got, want = ae(x), dense_topk_reference(ae, x)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad((got - target).pow(2).sum(), list(ae.parameters()))
    reference = torch.autograd.grad((want - target).pow(2).sum(), list(ae.parameters()))
    names = [name for name, _ in ae.named_parameters()]
    for name, g, r in zip(names, grads, reference):
        torch.testing.assert_close(g, r, msg=f"gradient of {name}")


def test_batch_topk_sparse_path_matches_dense_autograd():
    ae = _randomise(BatchTopKSAE(10, 30, 3).double(), seed=2)
    x = torch.randn(8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    code = ae.sparse_code(x)
    got = ae.decode_sparse(code, x)
    pre = F.relu((x - ae.b_dec) @ ae.encoder.weight.t() + ae.encoder.bias)
    threshold = pre.flatten().topk(3 * 8).values.min()
    codes = pre * (pre >= threshold)
    want = codes @ ae.decoder.weight.t() + ae.b_dec
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(code.to_dense(30), codes)
    torch.testing.assert_close(ae.encode(x, use_threshold=False), codes)
    grads = torch.autograd.grad(got.pow(2).sum(), list(ae.parameters()))
    reference = torch.autograd.grad(want.pow(2).sum(), list(ae.parameters()))
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r)
    # k*batch codes, spread over rows
    assert int((codes > 0).sum()) == 24 and len({*code.rows.tolist()}) > 1


def test_encode_decode_api():
    ae = AutoEncoderTopK(16, 64, 4)
    x = torch.randn(10, 16)
    codes, values, indices, pre = ae.encode(x, return_topk=True)
    assert (codes.shape == (10, 64) and ((codes > 0).sum(-1) <= 4).all()
            and values.shape == indices.shape == (10, 4))
    x_hat, f = ae(x, output_features=True)
    torch.testing.assert_close(x_hat, ae.decode(f))
    torch.testing.assert_close(ae(x), x_hat, atol=1e-5, rtol=1e-5)  # sparse path == dense path
    torch.testing.assert_close(ae(x[None]), x_hat[None], atol=1e-5, rtol=1e-5)  # leading dims
    relu = AutoEncoder(16, 64)
    out, f = relu(x, output_features=True)
    assert out.shape == (10, 16) and (f >= 0).all()


def test_batch_topk_threshold_at_inference():
    ae = _randomise(BatchTopKSAE(8, 20, 2), seed=5)
    x = torch.randn(6, 8)
    pre = F.relu((x - ae.b_dec) @ ae.encoder.weight.t() + ae.encoder.bias)
    # no threshold learned yet: every positive code passes, as upstream ...
    torch.testing.assert_close(ae.encode(x), pre)
    # ... or, asked for, the batch top-k
    ae.batch_topk_fallback = True
    assert int((ae.encode(x) > 0).sum()) == 2 * 6
    ae.threshold.fill_(0.7)
    codes = ae.encode(x)
    torch.testing.assert_close(codes, pre * (pre > 0.7))


def test_bad_input():
    with pytest.raises(ValueError, match=r"k must be an int in \[1, dict_size=8\], got 9"):
        AutoEncoderTopK(4, 8, 9)
    with pytest.raises(ValueError, match="dict_size must be a positive int"):
        AutoEncoder(4, 0)
    ae = AutoEncoderTopK(4, 8, 2)
    with pytest.raises(ValueError, match=r"expected input width 4, got shape \(3, 5\)"):
        ae(torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        ae(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown dict_class"):
        dictionary_from_config({"dict_class": "Nope"})
    with pytest.raises(ValueError, match="skip connection"):
        AutoEncoderTopK(4, 8, 2, transcoder=True, skip=True).decode(torch.zeros(1, 8))


def test_topk_trainer_loss_with_auxk_matches_dense_autograd():
    """The whole TopKTrainer loss, AuxK on dead latents included: value and every gradient in
    float64."""
    from dictionary_learning.trainers import TopKTrainer

    trainer = TopKTrainer(steps=10, activation_dim=12, dict_size=40, k=4, k_aux=6, auxk_alpha=0.5,
                          seed=0, dead_feature_threshold=100)
    ae = _randomise(trainer.ae.double(), seed=6)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40, generator=torch.Generator().manual_seed(7))[:15]] = True
    trainer.num_tokens_since_fired[dead] = 1000
    x = torch.randn(9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    loss = trainer.loss(x, y=x, step=1)
    grads = torch.autograd.grad(loss, list(ae.parameters()))

    pre = (x - ae.b_dec) @ ae.encoder.weight.t() + ae.encoder.bias
    top_values, top_indices = pre.topk(4, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top_indices, F.relu(top_values))
    x_hat = codes @ ae.decoder.weight.t() + ae.b_dec
    mse = (x - x_hat).pow(2).sum(-1).mean()
    residual = (x - x_hat).detach()
    # latents firing in this batch are alive again before AuxK (as upstream)
    dead &= ~(codes > 0).any(dim=0)
    aux_values, aux_indices = pre.masked_fill(~dead, -torch.inf).topk(6, dim=-1)
    aux_codes = torch.zeros_like(pre).scatter(-1, aux_indices, F.relu(aux_values))
    error = (residual - aux_codes @ ae.decoder.weight.t()).pow(2).sum(-1).mean()
    scale = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    reference = mse + 0.5 * error / scale
    torch.testing.assert_close(loss, reference)
    reference_grads = torch.autograd.grad(reference, list(ae.parameters()))
    for (name, _), g, r in zip(ae.named_parameters(), grads, reference_grads):
        torch.testing.assert_close(g, r, msg=f"gradient of {name}")
    by_name = dict(zip([name for name, _ in ae.named_parameters()], grads))
    # AuxK's gradient reaches the dead latents' encoder
    assert by_name["encoder.bias"][dead].abs().sum() > 0


def _every_sae():
    from dictionary_learning.dictionary import (
        AutoEncoderNew,
        GatedAutoEncoder,
        JumpReluAutoEncoder,
        MatryoshkaBatchTopKSAE,
    )

    return {"AutoEncoder": AutoEncoder(12, 40), "AutoEncoderNew": AutoEncoderNew(12, 40),
            "AutoEncoderTopK": AutoEncoderTopK(12, 40, 5), "BatchTopKSAE": BatchTopKSAE(12, 40, 5),
            "GatedAutoEncoder": GatedAutoEncoder(12, 40),
            "JumpReluAutoEncoder": JumpReluAutoEncoder(12, 40),
            "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKSAE(12, 40, 5, [20, 20])}


@pytest.mark.parametrize("name", sorted(_every_sae()))
def test_fold_scale_with_two_scales_is_exact_or_refused(name):
    """Trained on (2 x, 3 x), folded: new(x) must equal old(2 x) / 3 in float64, or, for SAEs whose
    encoder reads x - b_dec (one b_dec cannot carry both scales), fold_scale refuses."""
    import copy

    old = _randomise(_every_sae()[name].double(), seed=3)
    if hasattr(old, "threshold"):  # a learned (inference) threshold below most codes
        with torch.no_grad():
            old.threshold.fill_(0.01)
    new = copy.deepcopy(old)
    x = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    if name in ("AutoEncoderNew", "JumpReluAutoEncoder"):
        new.fold_scale(2.0, 3.0)
        torch.testing.assert_close(new(x), old(2.0 * x) / 3.0)
    else:
        with pytest.raises(ValueError, match="scale_in must equal scale_out"):
            new.fold_scale(2.0, 3.0)
        new.fold_scale(2.0, 2.0)  # one scale folds exactly
        torch.testing.assert_close(new(x), old(2.0 * x) / 2.0)

"""Upstream's `loss_recovered(text, model, submodule, dictionary, ...)` and `evaluate` keys, against
plain-PyTorch references: forward hooks that replace a module's output (or input) on each text run
alone, CE computed here, and the reconstruction metrics written out from their definitions in
float64."""

import math

import pytest
import torch

from dictionary_learning import ActivationBuffer, hook
from dictionary_learning.dictionary import AutoEncoderTopK
from dictionary_learning.evaluation import encode_inputs, evaluate, loss_recovered, patched_losses
from dictionary_learning.utils import get_submodule

from ..evaluation.test_evaluation import CTX, make_dictionary, reference_ce
from ..helpers import hook_reference, random_texts


def flat(dictionary, d):
    return lambda v: dictionary(v.reshape(-1, d)).reshape(*v.shape[:-1], -1)


@pytest.mark.parametrize("io", ["out", "in", "in_and_out"])
def test_upstream_form_matches_hook_reference(tiny_llama, io):
    texts = random_texts(5, seed=21)
    layer = tiny_llama.model.layers[1]
    if io == "out":  # the residual stream: the block's output
        submodule, path, replace_input, dictionary = (layer, "model.layers.1", False,
                                                      make_dictionary(64))
    # the MLP: its input replaced ("in"), or its output computed from its input by a transcoder
    else:
        submodule, path, replace_input = layer.mlp, "model.layers.1.mlp", io == "in"
        dictionary = make_dictionary(64, 64 if io == "in_and_out" else None, seed=2)
    got = loss_recovered(texts, tiny_llama, submodule, dictionary, max_len=CTX, io=io)
    assert isinstance(got, tuple) and len(got) == 3 and all(isinstance(v, torch.Tensor)
                                                            for v in got)
    clean, _ = reference_ce(tiny_llama, texts, path)
    if io == "in_and_out":
        mlp = tiny_llama._module.model.layers[1].mlp
        handle = mlp.register_forward_hook(lambda m, args, out: flat(dictionary, 64)(args[0]))
        try:
            patched, _ = reference_ce(tiny_llama, texts, path)
        finally:
            handle.remove()
    else:
        patched, _ = reference_ce(tiny_llama, texts, path, replace=flat(dictionary, 64),
                                  replace_input=replace_input)
    zero, _ = reference_ce(tiny_llama, texts, path, replace=torch.zeros_like,
                           replace_input=replace_input)
    assert [v.item() for v in got] == pytest.approx([clean, patched, zero], abs=1e-4)
    # both patches changed something
    assert abs(patched - clean) > 1e-3 and abs(zero - clean) > 1e-3


def test_normalize_batch_scales_in_and_back(tiny_gpt2):
    texts = random_texts(4, seed=22)
    point = hook(tiny_gpt2, 2, "resid")
    torch.manual_seed(5)
    dictionary = AutoEncoderTopK(48, 192, 6)
    with torch.no_grad():  # biases make the dictionary scale-dependent, so the scaling shows
        dictionary.b_dec.normal_()
        dictionary.encoder.bias.normal_(0, 0.3)
    [acts] = hook_reference(tiny_gpt2, texts, [point], CTX)  # every real token of the batch
    scale = 48 ** 0.5 / acts.norm(dim=-1).mean()
    got = loss_recovered(texts, tiny_gpt2, tiny_gpt2.transformer.h[2], dictionary, max_len=CTX,
                         normalize_batch=True)
    patched, _ = reference_ce(tiny_gpt2, texts, point.path,
                              replace=lambda v: flat(dictionary, 48)(v * scale) / scale)
    unscaled, _ = reference_ce(tiny_gpt2, texts, point.path, replace=flat(dictionary, 48))
    assert got[1].item() == pytest.approx(patched, abs=1e-4)
    assert abs(patched - unscaled) > 1e-3


def test_token_ids_and_call_forms(tiny_llama):
    # equal byte lengths: token ids without padding
    texts = [f"same length text {i}" for i in range(3)]
    ids = encode_inputs(tiny_llama, texts, CTX)["input_ids"]
    assert ids.shape == (3, 1 + len(texts[0]))
    dictionary = make_dictionary(64)
    block = get_submodule(tiny_llama, 1)
    from_ids = loss_recovered(ids, tiny_llama, block, dictionary)
    from_texts = loss_recovered(texts, tiny_llama, "model.layers.1", dictionary)
    torch.testing.assert_close(torch.stack(from_ids), torch.stack(from_texts))
    point = hook(tiny_llama, 1, "resid")
    toolkit = patched_losses(texts, tiny_llama, dictionary, (point,))
    keyword = patched_losses(texts, tiny_llama, dictionary, hooks=(point,))
    assert toolkit == keyword and toolkit["ce_patched"] == pytest.approx(from_texts[1].item(),
                                                                         abs=1e-6)
    ragged = encode_inputs(tiny_llama, [[5, 6, 7], [8]], None)
    assert (ragged["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
            and ragged["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match="io must be one of"):
        loss_recovered(texts, tiny_llama, block, dictionary, io="sideways")
    for points in (point, (point,)):  # hook points where upstream's dictionary goes: a clear error
        with pytest.raises(TypeError, match="patched_losses"):
            loss_recovered(texts, tiny_llama, dictionary, points)


def upstream_metrics(dictionary, x):
    """Upstream's definitions, in float64, for one batch."""
    x_hat, f = (v.double() for v in dictionary(x, output_features=True))
    x = x.double()
    return {
        "l2_loss": (x - x_hat).norm(dim=-1).mean().item(),
        "l1_loss": f.abs().sum(-1).mean().item(),
        "l0": (f != 0).double().sum(-1).mean().item(),
        "frac_variance_explained": (1 - torch.var(x - x_hat, dim=0).sum()
                                    / torch.var(x, dim=0).sum()).item(),
        "cossim": ((x / x.norm(dim=-1, keepdim=True))
                   * (x_hat / x_hat.norm(dim=-1, keepdim=True))).sum(-1).mean().item(),
        "l2_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
        "relative_reconstruction_bias": ((x_hat.norm(dim=-1) ** 2).mean()
                                         / (x * x_hat).sum(-1).mean()).item(),
    }, (f != 0).any(dim=0)


@pytest.mark.parametrize("normalize_batch", [False, True])
def test_evaluate_keys_follow_upstream_definitions(normalize_batch):
    dictionary = make_dictionary(16, seed=4)
    generator = torch.Generator().manual_seed(0)
    batches = [3 * torch.randn(40, 16, generator=generator) + 1 for _ in range(3)]
    got = evaluate(dictionary, iter(batches), n_batches=3, normalize_batch=normalize_batch)
    per_batch, alive = [], torch.zeros(64, dtype=torch.bool)
    for x in batches:
        if normalize_batch:
            x = x / x.norm(dim=-1).mean() * 16 ** 0.5
        metrics, fired = upstream_metrics(dictionary, x)
        per_batch.append(metrics)
        alive |= fired
    for key in per_batch[0]:
        assert got[key] == pytest.approx(sum(m[key] for m in per_batch) / 3, rel=1e-5,
                                         abs=1e-6), key
    assert got["frac_alive"] == pytest.approx(alive.double().mean().item())
    assert got["tokens"] == 120 and "loss_original" not in got


def test_evaluate_with_buffer_upstream_call(tiny_llama):
    seen = []

    def data():
        for text in random_texts(60, seed=23):
            seen.append(text)
            yield text

    buffer = ActivationBuffer(data(), tiny_llama, tiny_llama.model.layers[1], d_submodule=64,
                              n_ctxs=6, ctx_len=CTX, refresh_batch_size=3, out_batch_size=32)
    dictionary = make_dictionary(64, seed=6)
    # upstream's positional call
    results = evaluate(dictionary, buffer, CTX, 4, io="out", device="cpu", n_batches=1)
    texts = seen[-4:]  # the loss batch: the texts read right after the first activation batch
    clean, _ = reference_ce(tiny_llama, texts, "model.layers.1")
    patched, _ = reference_ce(tiny_llama, texts, "model.layers.1", replace=flat(dictionary, 64))
    zero, _ = reference_ce(tiny_llama, texts, "model.layers.1", replace=torch.zeros_like)
    assert ([results[k] for k in ("loss_original", "loss_reconstructed", "loss_zero")]
            == pytest.approx([clean, patched, zero], abs=1e-4))
    assert results["frac_recovered"] == pytest.approx((patched - zero) / (clean - zero), abs=1e-3)
    assert results["ce_clean"] == results["loss_original"] and math.isfinite(results["kl_patched"])
    for key in ("l2_loss", "l1_loss", "l0", "frac_variance_explained", "cossim", "l2_ratio",
                "relative_reconstruction_bias", "frac_alive", "mse", "fvu"):
        assert math.isfinite(results[key]), key


def test_evaluate_runs_loss_batches_beyond_n_batches(tiny_gpt2):
    """This toolkit's loss_batches option: more loss batches than activation batches still run (the
    quickstart's call), and loss_batches=0 runs none."""
    buffer = ActivationBuffer(iter(random_texts(40, seed=24)), tiny_gpt2,
                              tiny_gpt2.transformer.h[0], n_ctxs=4, ctx_len=CTX,
                              refresh_batch_size=4, out_batch_size=16)
    calls = []
    text_batch = buffer.text_batch
    buffer.text_batch = lambda batch_size=None: calls.append(batch_size) or text_batch(batch_size)
    results = evaluate(make_dictionary(48), buffer, max_len=CTX, batch_size=2, n_batches=1,
                       loss_batches=3)
    assert calls.count(2) == 3 and math.isfinite(results["frac_recovered"])
    assert "loss_original" not in evaluate(make_dictionary(48), buffer, n_batches=1, loss_batches=0)


def test_evaluate_on_a_head_buffer_skips_the_loss_as_upstream():
    """Per-head activations cannot be patched back as one module's output: evaluate reports
    reconstruction metrics (on `[batch, n_heads, d_head]` batches) and no loss keys, as upstream."""
    from dictionary_learning import AutoEncoder, load_model
    from dictionary_learning.buffer import HeadActivationBuffer

    model = load_model("tiny-llama")
    buffer = HeadActivationBuffer(iter(random_texts(40)), model, 0, n_ctxs=16, ctx_len=16,
                                  refresh_batch_size=8, out_batch_size=32)
    metrics = evaluate(AutoEncoder(model.config.head_dim, 64), buffer, batch_size=8, n_batches=2)
    assert "l2_loss" in metrics and 0 <= metrics["frac_alive"] <= 1
    assert not {"loss_original", "frac_recovered", "ce_clean"} & set(metrics)

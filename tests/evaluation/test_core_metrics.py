"""SAEBench's core metrics under its names, against independent computations: a plain forward hook
for the mean ablation, float64 sums over the concatenated batches for the variances, norms and
frequencies, a brute-force cosine matrix for the max-cosine metrics, and SAEBench's score formulas
from the raw CEs and KLs."""

import math

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning import ActivationBuffer, hook
from dictionary_learning.core_metrics import CORE_GROUPS, core_groups
from dictionary_learning.dictionary import AutoEncoder, AutoEncoderTopK
from dictionary_learning.evaluation import evaluate, patched_losses

from ..helpers import random_texts
from .test_evaluation import CTX, reference_ce


def test_mean_ablation_matches_a_forward_hook(tiny_model):
    texts = random_texts(6, seed=21)
    point = hook(tiny_model, 1, "resid")
    d = tiny_model._module.config.hidden_size
    torch.manual_seed(0)
    ae = AutoEncoderTopK(d, 4 * d, 8)
    got = patched_losses(texts, tiny_model, ae, (point,), ctx_len=CTX, mean_ablation=True)
    module = tiny_model._module.get_submodule(point.path)
    seen = []
    handle = module.register_forward_hook(lambda m, args, out:
                                          seen.append((out[0] if isinstance(out, tuple)
                                                       else out).reshape(-1, d)))
    try:
        # each text alone: real tokens only
        clean, clean_logits = reference_ce(tiny_model, texts, point.path)
    finally:
        handle.remove()
    mean = torch.cat(seen).double().mean(dim=0).float()
    ablated, mean_logits = reference_ce(tiny_model, texts, point.path,
                                        replace=lambda v: mean.expand_as(v))
    zero, zero_logits = reference_ce(tiny_model, texts, point.path, replace=torch.zeros_like)

    def kl(others):
        return torch.cat([(F.softmax(c, -1) * (F.log_softmax(c, -1) - F.log_softmax(o, -1))).sum(-1)
                          for c, o in zip(clean_logits, others)]).mean().item()

    assert got["ce_mean"] == pytest.approx(ablated, abs=1e-4)
    assert got["kl_mean"] == pytest.approx(kl(mean_logits), abs=1e-4)
    assert got["kl_zero"] == pytest.approx(kl(zero_logits), abs=1e-4)
    assert got["frac_recovered_mean"] == pytest.approx((ablated - got["ce_patched"])
                                                       / (ablated - clean), abs=1e-3)
    assert got["kl_mean"] != pytest.approx(got["kl_zero"], rel=1e-3)  # the two baselines differ
    assert got["tokens"] == sum(len(tiny_model.tokenizer(t, truncation=True,
                                                         max_length=CTX)["input_ids"]) - 1
                                for t in texts)


def test_reconstruction_and_frequency_metrics_against_float64_sums():
    torch.manual_seed(1)
    ae = AutoEncoder(24, 96)
    batches = [torch.randn(40, 24) * torch.linspace(0.5, 2, 24) + 0.3 for _ in range(3)]
    got = evaluate(ae, iter(batches), n_batches=3)
    x = torch.cat(batches).double()
    with torch.no_grad():
        x_hat, f = ae(x.float(), output_features=True)
    x_hat, f = x_hat.double(), f.double()
    error = (x - x_hat).pow(2).sum()
    assert (got["explained_variance"]
            == pytest.approx(1 - (error / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-5))
    legacy = torch.cat([1 - (b.double() - h).pow(2).sum(-1)
                        / (b.double() - b.double().mean(0)).pow(2).sum(-1)
                        for b, h in zip(batches, x_hat.split(40))])
    assert got["explained_variance_legacy"] == pytest.approx(legacy.mean().item(), rel=1e-5)
    assert got["l2_norm_in"] == pytest.approx(x.norm(dim=-1).mean().item(), rel=1e-5)
    assert got["l2_norm_out"] == pytest.approx(x_hat.norm(dim=-1).mean().item(), rel=1e-5)
    assert got["l1"] == pytest.approx(f.sum(-1).mean().item(), rel=1e-5)
    density = (f > 0).double().mean(0)
    assert got["freq_over_1_percent"] == pytest.approx((density > 0.01).double().mean().item())
    assert (got["freq_over_10_percent"] == got["dense_fraction"]
            == pytest.approx((density > 0.1).double().mean().item()))
    assert got["normalized_freq_over_10_percent"] == pytest.approx(
        (density[density > 0.1].sum() / density.sum()).item(), rel=1e-5)
    assert got["dead_fraction"] == pytest.approx(1 - got["frac_alive"])
    assert got["total_tokens_eval_sparsity_variance"] == 120

    def brute_force_average_max_cosine(rows: torch.Tensor) -> float:
        unit = rows.double() / rows.double().norm(dim=-1, keepdim=True)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-2)
        return similarity.max(dim=1).values.mean().item()

    assert got["average_max_encoder_cosine_sim"] == pytest.approx(
        brute_force_average_max_cosine(ae.encoder.weight.detach()), rel=1e-5)
    assert got["average_max_decoder_cosine_sim"] == pytest.approx(
        brute_force_average_max_cosine(ae.decoder.weight.detach().T), rel=1e-5)


def test_evaluate_gives_saebench_core_groups(tiny_llama):
    texts = random_texts(40, seed=22)
    buffer = ActivationBuffer(iter(texts), tiny_llama, hook(tiny_llama, 1, "resid"), n_ctxs=8,
                              ctx_len=CTX, refresh_batch_size=4, out_batch_size=64, remove_bos=True)
    torch.manual_seed(2)
    results = evaluate(AutoEncoderTopK(64, 256, 8), buffer, max_len=CTX, batch_size=4, n_batches=2)
    groups = core_groups(results)
    assert set(groups) == set(CORE_GROUPS)
    for group, names in CORE_GROUPS.items():
        assert set(groups[group]) == set(names), group
        assert all(math.isfinite(value) for value in groups[group].values()), group
    # SAEBench's score formulas, from the averaged raw values
    assert results["ce_loss_score"] == pytest.approx((results["ce_zero"] - results["ce_patched"])
                                                     / (results["ce_zero"] - results["ce_clean"]))
    assert results["kl_div_score"] == pytest.approx((results["kl_zero"] - results["kl_patched"])
                                                    / results["kl_zero"])
    assert results["kl_div_score_mean_ablation"] == pytest.approx(
        (results["kl_mean"] - results["kl_patched"]) / results["kl_mean"])
    assert results["ce_loss_with_sae"] == results["ce_patched"] == results["loss_reconstructed"]
    assert results["total_tokens_eval_reconstruction"] > 0

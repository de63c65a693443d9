"""SAEBench's core metrics under SAEBench's names (`sae_bench/evals/core`), computed from what
`evaluate` measures, and grouped as SAEBench's core output groups (`core_groups`) so its plotting
reads them unchanged.

    model_behavior_preservation    kl_div_score, kl_div_with_ablation,
                                   kl_div_with_sae (+ the mean-ablation pair)
    model_performance_preservation ce_loss_score, ce_loss_with_ablation, ce_loss_with_sae,
                                   ce_loss_without_sae (+ mean)
    reconstruction_quality         explained_variance, explained_variance_legacy, mse, cossim
    shrinkage                      l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias
    sparsity                       l0, l1
    misc                           freq_over_1_percent, freq_over_10_percent,
                                   normalized_freq_over_{1,10}_percent,
                                   average_max_encoder_cosine_sim, average_max_decoder_cosine_sim,
                                   frac_alive, dead_fraction, dense_fraction
    token_stats                    total_tokens_eval_reconstruction,
                                   total_tokens_eval_sparsity_variance

Definitions (where they differ from SAEBench, said so): scores are (ablation - with dictionary) /
(ablation - clean) for CE and (ablation - with dictionary) / ablation for KL(clean || run), from CEs
/ KLs averaged over the loss batches, with the zero-ablation baseline (SAEBench's) and, under
`*_mean_ablation`, the hook point's mean over each batch's real tokens. explained_variance is 1 -
FVU over all evaluated tokens (total variance about their global mean; SAEBench's intended formula),
explained_variance_legacy SAEBench's per-token 1 - |e|^2 / |y - batch mean|^2. mse is this toolkit's
mean squared error norm E|y - y_hat|^2 (SAEBench divides it again by its batch's token count). For
transcoders the norms and variances are those of the target (the output side). dead_fraction = 1 -
frac_alive over the evaluated tokens; dense_fraction: features firing on more than 10% of them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .dictionary import Dictionary

CORE_GROUPS: dict[str, tuple[str, ...]] = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae",
                                    "kl_div_score_mean_ablation", "kl_div_with_mean_ablation"),
    "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                       "ce_loss_without_sae", "ce_loss_score_mean_ablation",
                                       "ce_loss_with_mean_ablation"),
    "reconstruction_quality": ("explained_variance", "explained_variance_legacy", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
    "misc": ("freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
             "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
             "average_max_decoder_cosine_sim",
             "frac_alive", "dead_fraction", "dense_fraction"),
    "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
}


def recovered_fraction(baseline: Any, patched: Any, clean: Any,
                       what: str = "the recovered fraction") -> float:
    """(baseline - patched) / (baseline - clean), e.g. CE recovered against zero-ablation: undefined
    (NaN, with a warning) where the baseline equals the clean run to rounding, instead of a huge or
    infinite score."""
    baseline, patched, clean = (float(v) for v in (baseline, patched, clean))
    gap = baseline - clean
    if not math.isfinite(gap) or abs(gap) <= 1e-6 * max(abs(baseline), abs(clean), 1e-12):
        warnings.warn(f"{what} is undefined: the ablated run's loss equals the clean run's "
                      f"({baseline:.6g} vs {clean:.6g}), so there is nothing to recover; reported "
                      "as NaN")
        return float("nan")
    return (baseline - patched) / gap

def density_metrics(density: torch.Tensor) -> dict[str, float]:
    """SAEBench's frequency metrics of per-feature firing frequencies `[d_sae]`."""
    density = density.float().cpu()
    total = density.sum()
    over = {p: density > p / 100 for p in (1, 10)}
    results = {f"freq_over_{p}_percent": mask.float().mean().item() for p, mask in over.items()}
    for p, mask in over.items():
        results[f"normalized_freq_over_{p}_percent"] = ((density[mask].sum() / total).item()
                                                        if total > 0 else 0.0)
    results["dead_fraction"] = (density == 0).float().mean().item()
    results["dense_fraction"] = results["freq_over_10_percent"]
    return results


def max_cosine_similarities(vectors: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each row of `[n, d]`, the largest cosine similarity with any other row: `[n]` (chunked,
    no n x n)."""
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    best = torch.empty(unit.shape[0], device=unit.device)
    for start in range(0, unit.shape[0], chunk):
        similarity = unit[start:start + chunk] @ unit.T
        rows = torch.arange(similarity.shape[0], device=unit.device)
        similarity[rows, rows + start] = -float("inf")
        best[start:start + chunk] = similarity.max(dim=1).values
    return best


@torch.no_grad()
def weight_metrics(dictionary: Dictionary) -> dict[str, float]:
    """average_max_encoder_cosine_sim / average_max_decoder_cosine_sim over features (NaN for a
    dictionary whose weights have no single encoder and decoder direction per feature, such as a
    gated one)."""
    from .formats.weights import weights_of

    try:
        weights = weights_of(dictionary)
    except ValueError:
        return {"average_max_encoder_cosine_sim": float("nan"),
                "average_max_decoder_cosine_sim": float("nan")}
    return {"average_max_encoder_cosine_sim": max_cosine_similarities(weights.W_enc).mean().item(),
            "average_max_decoder_cosine_sim": max_cosine_similarities(weights.W_dec).mean().item()}


def saebench_names(results: dict[str, Any]) -> dict[str, float]:
    """SAEBench's loss-based core names from `evaluate`'s averaged CEs and KLs (ce_clean,
    ce_patched, ce_zero, ce_mean, kl_patched, kl_zero, kl_mean); keys whose inputs are missing are
    left out."""
    named: dict[str, float] = {}
    if "ce_patched" in results:
        named.update(ce_loss_without_sae=results["ce_clean"],
                     ce_loss_with_sae=results["ce_patched"])
    for baseline, suffix in (("zero", ""), ("mean", "_mean_ablation")):
        ce, kl = results.get(f"ce_{baseline}"), results.get(f"kl_{baseline}")
        if ce is not None and "ce_patched" in results:
            named[f"ce_loss_with{'_mean' if suffix else ''}_ablation"] = ce
            named[f"ce_loss_score{suffix}"] = recovered_fraction(ce, results["ce_patched"],
                                                                 results["ce_clean"],
                                                                  f"ce_loss_score{suffix}")
        if kl is not None and "kl_patched" in results:
            named[f"kl_div_with{'_mean' if suffix else ''}_ablation"] = kl
            named[f"kl_div_score{suffix}"] = recovered_fraction(kl, results["kl_patched"], 0.0,
                                                                 f"kl_div_score{suffix}")
    if "kl_patched" in results:
        named["kl_div_with_sae"] = results["kl_patched"]
    return named


def core_groups(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`evaluate`'s results as SAEBench's core output groups (`eval_result_metrics` of its core eval
    output)."""
    return {group: {name: results[name] for name in names if name in results}
            for group, names in CORE_GROUPS.items()}

"""`evaluate`: a dictionary's reconstruction metrics averaged over activation batches and, given a
buffer over an nnsight model, `patched_losses` averaged over its texts, under upstream's, this
toolkit's and SAEBench's names."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..buffer import ActivationBuffer, HeadActivationBuffer
from ..checks import integer
from ..core_metrics import density_metrics, saebench_names, weight_metrics
from ..dictionary import Dictionary
from ..progress import progress_bar
from .loss import TRACER_ARGS, hook_points_for, patched_losses
from .metrics import check_finite, reconstruction_metrics, without_variance


def _normalized(batch: Any, d_in: int) -> Any:
    """Upstream's normalize_batch: x scaled to mean norm sqrt(d_in) (a target y by x's factor)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    scale = d_in ** 0.5 / x.float().norm(dim=-1).mean()
    return (tuple(side * scale for side in batch) if isinstance(batch, (tuple, list))
            else batch * scale)


@torch.no_grad()
def _fvu(error_sum: torch.Tensor, square_sum: torch.Tensor, vector_sum: torch.Tensor,
         tokens: int) -> float:
    """Summed squared error over the summed squared distance from the mean, from running sums (NaN
    where the targets have no variance, or there are none)."""
    if not tokens:
        return float("nan")
    variance = square_sum / tokens - (vector_sum / tokens).pow(2).sum()
    return (float("nan") if without_variance(variance, square_sum / tokens)
            else (error_sum / tokens / variance).item())


def evaluate(
    dictionary: Dictionary,
    activations: ActivationBuffer | Iterable[Any],
    max_len: int = 128,
    batch_size: int = 128,
    io: str = "out",
    normalize_batch: bool = False,
    tracer_args: Mapping[str, Any] = TRACER_ARGS,
    device: str | torch.device | None = None,
    n_batches: int = 1,
    *,
    loss_batches: int | None = None,
    mean_ablation: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Metrics averaged over `n_batches` activation batches (fewer if `activations` runs out first)
    and, when `activations` is an ActivationBuffer over an nnsight model (`pytorch_buffer`'s has no
    traces), patched_losses averaged over `loss_batches` batches of `batch_size` of its texts
    (default: one after each activation batch, as upstream; more than n_batches follow the last).

    Keys: upstream's l2_loss, l1_loss, l0, frac_variance_explained, cossim, l2_ratio,
    relative_reconstruction_bias, frac_alive (features that fired at least once); fvu_all_tokens
    (1 - explained_variance: summed squared error over the summed variance of every token) and
    fvu_typical_tokens (the same without the tokens whose norm exceeds TYPICAL_NORM_MULTIPLE = 10
    times their batch's median, typical_tokens_excluded of them: one massive-activation token can
    move the first figure by 10%), explained_variance_per_token_median (the median over tokens of
    1 - squared error / squared distance from the batch mean); fvu is the mean over batches of each
    batch's FVU; and, with a buffer,
    loss_original, loss_reconstructed, loss_zero, frac_recovered; this toolkit's mse, fvu, tokens
    and, with a buffer, ce_clean, ce_patched, ce_zero (the same CEs), ce_mean (mean ablation),
    kl_patched, kl_zero, kl_mean, frac_recovered_mean (see `reconstruction_metrics`,
    `patched_losses`); and SAEBench's core names (`core_metrics`: kl_div_score, ce_loss_score, each
    also against mean ablation, explained_variance, l2_norm_in, freq_over_1_percent, dead_fraction,
    ...; `core_metrics.core_groups` groups them as SAEBench does; mean_ablation=False skips the
    fourth, mean-ablated run of each loss batch and the keys it gives). The buffer's own hook
    points are patched (this toolkit's buffer knows what it read; `io` serves buffers that only
    name a submodule). normalize_batch: upstream's (see `patched_losses`). device: where the
    dictionary runs (default: where it is).
    progress: a bar over the batches on stderr once they take more than a few seconds
    (`progress.DELAY`), so a sweep's short calls stay quiet.
    """
    integer("n_batches", n_batches)
    check_finite("the dictionary's parameters", *dictionary.parameters())
    if device is not None:
        dictionary = dictionary.to(device)
    loss_batches = n_batches if loss_batches is None else loss_batches
    hooks = getattr(activations, "hooks", None)
    # CE needs a buffer over an nnsight model (not PyTorch hooks, not single heads)
    with_loss = (loss_batches > 0 and not isinstance(activations, HeadActivationBuffer)
                 and hasattr(activations, "text_batch")
                 and hasattr(getattr(activations, "model", None), "trace"))
    iterator = iter(activations)
    totals: dict[str, float] = {}
    loss_totals: dict[str, float] = {}
    fired, count, tokens, loss_count, loss_tokens, sums = None, 0, 0, 0, 0, None
    typical_sums, per_token = None, []

    def add_loss_batch() -> None:
        nonlocal hooks, loss_count, loss_tokens
        try:
            texts = activations.text_batch(batch_size)
        except StopIteration:
            return
        if hooks is None:
            hooks = hook_points_for(activations.model, activations.submodule, io)
        losses = patched_losses(texts, activations.model, dictionary, tuple(hooks),
                                ctx_len=max_len or 128,
                                patch_mask_fn=getattr(activations, "token_mask", None),
                                normalize_batch=normalize_batch, tracer_args=tracer_args,
                                mean_ablation=mean_ablation, progress=False)
        bar.update()
        loss_tokens += losses.pop("tokens")
        for key, value in losses.items():
            loss_totals[key] = loss_totals.get(key, 0.0) + value
        loss_count += 1

    bar = progress_bar(desc=f"evaluating {type(dictionary).__name__}", enabled=progress,
                       unit="batch", total=n_batches + (loss_batches if with_loss else 0))
    for index in range(n_batches):
        batch = next(iterator, None)
        if batch is None:
            break
        if normalize_batch:
            batch = _normalized(batch, dictionary.d_in)
        metrics = reconstruction_metrics(dictionary, batch)
        fired = metrics["_fired"] if fired is None else fired + metrics["_fired"]
        sums = metrics["_sums"] if sums is None else tuple(a + b
                                                           for a, b in zip(sums, metrics["_sums"]))
        typical_sums = (metrics["_typical_sums"] if typical_sums is None
                        else tuple(a + b for a, b in zip(typical_sums, metrics["_typical_sums"])))
        per_token.append(metrics["_per_token"])
        tokens += metrics["_tokens"]
        for key, value in metrics.items():
            if not key.startswith("_"):
                totals[key] = totals.get(key, 0.0) + value
        count += 1
        bar.update()
        # interleaved as upstream, so the same texts are used
        if with_loss and index < loss_batches:
            add_loss_batch()
    # more loss batches than batches
    for _ in range(loss_batches - min(count, loss_batches) if with_loss else 0):
        add_loss_batch()
    bar.close()
    if count == 0:
        raise ValueError("activations yielded no batches")
    results = {key: value / count for key, value in totals.items()}
    results["frac_alive"] = (fired > 0).float().mean().item()
    results["tokens"] = tokens
    # FVU over all tokens, and over the typical ones, about their global mean
    results["fvu_all_tokens"] = _fvu(*sums, tokens)
    results["explained_variance"] = 1 - results["fvu_all_tokens"]
    results["fvu_typical_tokens"] = _fvu(*typical_sums)
    results["typical_tokens_excluded"] = tokens - typical_sums[-1]
    results["explained_variance_per_token_median"] = torch.cat(per_token).median().item()
    results.update(density_metrics(fired.float() / tokens), **weight_metrics(dictionary),
                   total_tokens_eval_sparsity_variance=tokens)
    if with_loss and not loss_count:
        warnings.warn("the buffer's texts ran out before any loss batch: no CE / KL metrics (give "
                      "it more texts than its refresh_batch_size)")
    if loss_count:
        results.update({key: value / loss_count for key, value in loss_totals.items()})
        for upstream_key, key in (("loss_original", "ce_clean"),
                                  ("loss_reconstructed", "ce_patched"), ("loss_zero", "ce_zero")):
            results[upstream_key] = results[key]
        results.update(saebench_names(results), total_tokens_eval_reconstruction=loss_tokens)
    return results


"""Reconstruction metrics of activation batches, feature density and activation statistics: what a
dictionary does to activations it is given, with no model run (`loss.py` patches the model;
`summary.py` averages both)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..dictionary import Dictionary
from ..files import pyplot, save_figure
from ..progress import progress_bar

# evaluation's "typical" tokens: target norm at most this multiple of the batch's median (the rest
# are massive-activation tokens, a handful of which can hold most of the squared norm)
TYPICAL_NORM_MULTIPLE = 10.0


@torch.no_grad()
def without_variance(variance: torch.Tensor, squares: torch.Tensor) -> bool:
    """Whether targets have (almost) no variance about their mean, where FVU and explained variance
    mean nothing."""
    return bool(variance <= 1e-10 * squares.clamp_min(1e-30))


def check_finite(name: str, *tensors: torch.Tensor) -> None:
    """A clear error for NaN / inf values, which would make every metric NaN or, worse, a plausible
    number."""
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} hold NaN / inf values "
                             f"({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()}): clean "
                             "them (or find where they came from) before evaluating")


def reconstruction_metrics(dictionary: Dictionary, batch: Any) -> dict[str, Any]:
    """Metrics of one batch `[n, d]` (or an `(x, y)` pair for transcoders): this toolkit's mse (mean
    squared error norm), fvu (error energy / total variance) and upstream's l2_loss (mean
    error norm), l1_loss, l0, cossim, l2_ratio, frac_variance_explained (1 - summed variance of the
    error / summed variance of y) and relative_reconstruction_bias (E||y_hat||^2 / E<y, y_hat>, eq.
    10 of arXiv:2404.16014), and SAEBench's explained_variance_legacy, l2_norm_in / l2_norm_out (of
    y and y_hat) and l1 (summed features); per-feature firing counts in `_fired`, sums for a global
    explained variance in `_sums` (all tokens) and `_typical_sums` (the tokens whose target norm is
    at most TYPICAL_NORM_MULTIPLE times the batch's median; and their count), and each token's
    explained variance (1 - its squared error / its squared distance from the batch's mean) in
    `_per_token`."""
    if isinstance(batch, (tuple, list)):
        x, y = batch
    else:
        x = y = batch
    param = next(dictionary.parameters())
    x = x.reshape(-1, x.shape[-1]).to(param.device, param.dtype)
    y = y.reshape(-1, y.shape[-1]).to(param.device, param.dtype)
    check_finite("the activations", x, y)
    y_hat, f = dictionary(x, output_features=True)
    error = y - y_hat
    centred = (y - y.mean(dim=0)).pow(2).sum(-1)  # each token's squared distance from the mean
    total_variance = centred.sum()
    active = f != 0
    undefined = without_variance(total_variance.double(), y.double().pow(2).sum())
    if undefined:
        warnings.warn("FVU and explained variance are undefined on this batch: its targets have no "
                      "variance (every token is the same vector); reported as NaN")
    nan = float("nan")
    norms = y.float().norm(dim=-1)
    typical = norms <= TYPICAL_NORM_MULTIPLE * norms.median()
    squares = error.double().pow(2).sum(-1)
    return {
        "mse": error.pow(2).sum(dim=-1).mean().item(),
        "fvu": nan if undefined else (error.pow(2).sum() / total_variance).item(),
        "frac_variance_explained": nan if undefined else (1 - error.var(dim=0).sum()
                                                          / y.var(dim=0).sum()).item(),
        "cossim": F.cosine_similarity(y_hat, y, dim=-1).mean().item(),
        "l2_ratio": (y_hat.norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)).mean().item(),
        "relative_reconstruction_bias": (y_hat.pow(2).sum(-1).mean()
                                         / (y * y_hat).sum(-1).mean()).item(),
        "l2_loss": error.norm(dim=-1).mean().item(),
        "l1_loss": f.abs().sum(dim=-1).mean().item(),
        "l0": active.sum(dim=-1).float().mean().item(),
        "l1": f.sum(dim=-1).mean().item(),
        "l2_norm_in": y.norm(dim=-1).mean().item(),
        "l2_norm_out": y_hat.norm(dim=-1).mean().item(),
        "explained_variance_legacy": nan if undefined else (
            1 - error.pow(2).sum(-1) / centred).mean().item(),
        "_fired": active.sum(dim=0),
        "_tokens": x.shape[0],
        "_sums": (squares.sum(), y.double().pow(2).sum(), y.double().sum(dim=0)),
        "_typical_sums": (squares[typical].sum(), y[typical].double().pow(2).sum(),
                          y[typical].double().sum(dim=0), int(typical.sum())),
        "_per_token": (1 - squares / centred.double().clamp_min(1e-30)).float().cpu(),
    }


@torch.no_grad()
def feature_density(dictionary: Dictionary, batches: Iterable[Any], progress: bool = True
                    ) -> torch.Tensor:
    """Fraction of tokens on which each feature fires, over the given activation batches:
    `[d_sae]` (with a bar on stderr when that takes more than a few seconds)."""
    fired, tokens = None, 0
    for batch in progress_bar(batches, desc="feature density", enabled=progress, unit="batch"):
        metrics = reconstruction_metrics(dictionary, batch)
        fired = metrics["_fired"] if fired is None else fired + metrics["_fired"]
        tokens += metrics["_tokens"]
    if fired is None:
        raise ValueError("no batches to measure feature density on")
    return fired.float() / tokens


def plot_feature_density(density: torch.Tensor, path: str, title: str = "feature density") -> None:
    """Histogram of log10(firing frequency) as a PNG; dead features (never fired) are counted in the
    title."""
    plt = pyplot()

    alive = density[density > 0]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(alive.log10().cpu().numpy(), bins=50, color="tab:blue")
    axis.set_xlabel("log10(fraction of tokens the feature fires on)")
    axis.set_ylabel("features")
    axis.set_title(f"{title}: {len(alive)} alive, {int((density == 0).sum())} never fired")
    figure.tight_layout()
    save_figure(figure, path)


def activation_statistics(x: torch.Tensor) -> dict[str, float]:
    """Summary statistics of a `[n, d]` activation matrix: norms, variance, principal components,
    outliers."""
    x = x.float()
    norms = x.norm(dim=-1)
    centred = x - x.mean(dim=0)
    total_variance = centred.pow(2).sum(dim=-1).mean()
    singular = torch.linalg.svdvals(centred[:20000]) if x.shape[0] > 1 else torch.zeros(1)
    explained = singular.pow(2) / singular.pow(2).sum().clamp_min(1e-12)
    return {
        "tokens": x.shape[0],
        "width": x.shape[1],
        "mean_norm": norms.mean().item(),
        "median_norm": norms.median().item(),
        "max_norm": norms.max().item(),
        "norm_of_mean": x.mean(dim=0).norm().item(),
        "total_variance": total_variance.item(),
        "top1_pc_variance_fraction": explained[0].item(),
        "top10_pc_variance_fraction": explained[:10].sum().item(),
        "fraction_outlier_norm_tokens": (norms > 10 * norms.median()).float().mean().item(),
    }

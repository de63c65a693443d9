"""Evaluation: reconstruction metrics on activation batches, `loss_recovered` through nnsight patching, feature
density, top-activating contexts and activation statistics.

loss_recovered runs three traces on the same tokens: clean; with the hook point's value replaced by the
dictionary's reconstruction (a transcoder replaces the output side, computed from the input side); and with that
value zero-ablated. frac_recovered = (CE_zero - CE_patched) / (CE_zero - CE_clean). CE is computed here over the
(context, target) pairs of real tokens (HF's `labels=` miscounts left padding; upstream's ignore_index=pad_token_id
also scores a padded row's first token as predicted from a pad, and skips real tokens equal to the pad id, e.g. EOS).
KL is that of the patched next-token distribution from the clean one, averaged over real tokens. Positions the
buffer drops (padding; each context's first token with remove_bos) are left unpatched: the dictionary never saw them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from .buffer import ActivationBuffer, HeadActivationBuffer
from .checks import integer
from .core_metrics import density_metrics, recovered_fraction, saebench_names, weight_metrics
from .dictionary import Dictionary, apply_to_values
from .files import pyplot, save_figure
from .models import HookPoint, resolve_hook
from .progress import progress_bar
from .tracing import (masked_cross_entropy, next_token_kl, read_hook_points, run, token_mask,
                      tokenize)

# upstream's default model keywords for evaluation traces (no KV cache, no attention weights)
TRACER_ARGS: Mapping[str, Any] = MappingProxyType({"use_cache": False, "output_attentions": False})
IO_MODES = {"out": "out", "in": "in", "in_to_out": "in_to_out", "in_and_out": "in_to_out"}  # upstream: in_and_out


@torch.no_grad()
def _without_variance(variance: torch.Tensor, squares: torch.Tensor) -> bool:
    """Whether targets have (almost) no variance about their mean, where FVU and explained variance mean nothing."""
    return bool(variance <= 1e-10 * squares.clamp_min(1e-30))


def check_finite(name: str, *tensors: torch.Tensor) -> None:
    """A clear error for NaN / inf values, which would make every metric NaN or, worse, a plausible number."""
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} hold NaN / inf values ({int((~torch.isfinite(tensor)).sum())} of "
                             f"{tensor.numel()}): clean them (or find where they came from) before evaluating")


def reconstruction_metrics(dictionary: Dictionary, batch: Any) -> dict[str, Any]:
    """Metrics of one batch `[n, d]` (or an `(x, y)` pair for transcoders): this toolkit's mse (mean squared error
    norm), fvu (error energy / total variance) and upstream's l2_loss (mean error norm), l1_loss, l0, cossim,
    l2_ratio, frac_variance_explained (1 - summed variance of the error / summed variance of y) and
    relative_reconstruction_bias (E||y_hat||^2 / E<y, y_hat>, eq. 10 of arXiv:2404.16014), and SAEBench's
    explained_variance_legacy, l2_norm_in / l2_norm_out (of y and y_hat) and l1 (summed features); per-feature firing
    counts in `_fired`, sums for a global explained variance in `_sums`."""
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
    total_variance = (y - y.mean(dim=0)).pow(2).sum()
    active = f != 0
    undefined = _without_variance(total_variance.double(), y.double().pow(2).sum())
    if undefined:
        warnings.warn("FVU and explained variance are undefined on this batch: its targets have no variance (every "
                      "token is the same vector); reported as NaN")
    nan = float("nan")
    return {
        "mse": error.pow(2).sum(dim=-1).mean().item(),
        "fvu": nan if undefined else (error.pow(2).sum() / total_variance).item(),
        "frac_variance_explained": nan if undefined else (1 - error.var(dim=0).sum() / y.var(dim=0).sum()).item(),
        "cossim": F.cosine_similarity(y_hat, y, dim=-1).mean().item(),
        "l2_ratio": (y_hat.norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)).mean().item(),
        "relative_reconstruction_bias": (y_hat.pow(2).sum(-1).mean() / (y * y_hat).sum(-1).mean()).item(),
        "l2_loss": error.norm(dim=-1).mean().item(),
        "l1_loss": f.abs().sum(dim=-1).mean().item(),
        "l0": active.sum(dim=-1).float().mean().item(),
        "l1": f.sum(dim=-1).mean().item(),
        "l2_norm_in": y.norm(dim=-1).mean().item(),
        "l2_norm_out": y_hat.norm(dim=-1).mean().item(),
        "explained_variance_legacy": nan if undefined else (
            1 - error.pow(2).sum(-1) / (y - y.mean(dim=0)).pow(2).sum(-1)).mean().item(),
        "_fired": active.sum(dim=0),
        "_tokens": x.shape[0],
        "_sums": (error.double().pow(2).sum(), y.double().pow(2).sum(), y.double().sum(dim=0)),
    }


def encode_inputs(model: Any, inputs: Any, max_len: int | None) -> dict[str, torch.Tensor]:
    """`{"input_ids", "attention_mask"}` for a text, a list of texts (tokenized left padded, truncated to max_len),
    token ids `[batch, seq]` / `[seq]`, or a list of token-id lists (left padded with the pad id)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, torch.Tensor):
        ids = inputs[None] if inputs.dim() == 1 else inputs
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"token ids must be an integer tensor [batch, seq], got {inputs.dtype} "
                             f"{tuple(inputs.shape)}")
        ids = ids[:, :max_len] if max_len else ids
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = list(inputs)
    if inputs and all(isinstance(text, str) for text in inputs):
        return tokenize(model.tokenizer, inputs, max_len)
    if inputs and all(isinstance(row, (list, tuple)) and all(isinstance(t, int) for t in row) for row in inputs):
        rows = [list(row)[:max_len] if max_len else list(row) for row in inputs]
        width, pad = max(map(len, rows)), model.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        return {"input_ids": ids, "attention_mask": mask}
    raise TypeError("inputs must be a text, a list of texts, a tensor of token ids or a list of token-id lists, "
                    f"got {type(inputs).__name__}")


def hook_points_for(model: Any, submodule: Any, io: str) -> tuple[HookPoint, ...]:
    """The hook points that `loss_recovered` reads and patches for upstream's (submodule, io): io="out" / "in" the
    module's output / input; "in_to_out" (upstream: "in_and_out") reads the input and patches the output (of one
    module, or of a pair `(input_side, output_side)`)."""
    if io not in IO_MODES:
        raise ValueError(f"io must be one of {sorted(IO_MODES)}, got {io!r}")
    io = IO_MODES[io]
    if io == "in_to_out":
        source, target = submodule if isinstance(submodule, (tuple, list)) else (submodule, submodule)
        return resolve_hook(model, source, "input"), resolve_hook(model, target, "output")
    return (resolve_hook(model, submodule, "input" if io == "in" else "output"),)


def _runs(model: Any, encoding: dict[str, torch.Tensor], dictionary: Dictionary, hooks: tuple[HookPoint, ...],
          patch_mask: torch.Tensor, normalize_batch: bool, tracer_args: Mapping[str, Any],
          modes: tuple[str, ...] = ("clean", "patch", "zero"), progress: bool = False
          ) -> list[torch.Tensor]:
    """Logits of the clean run, the patched one, the zero-ablated one and (mode "mean") the one with the hook point's
    value replaced by its mean over the patched positions of this batch."""

    def reconstruct(source: torch.Tensor) -> torch.Tensor:
        if normalize_batch:  # as upstream: the source scaled to mean norm sqrt(d), the output back
            kept = source[patch_mask.to(source.device)]
            scale = dictionary.activation_dim ** 0.5 / kept.float().norm(dim=-1).mean()
            return apply_to_values(dictionary, source * scale) / scale
        return apply_to_values(dictionary, source)

    def mean(target: torch.Tensor) -> torch.Tensor:
        return target[patch_mask.to(target.device)].mean(dim=0).expand_as(target)

    patches = {"clean": {}, "patch": {hooks: reconstruct}, "zero": {hooks[-1]: torch.zeros_like},
               "mean": {hooks[-1]: mean}}
    desc = f"loss recovered ({', '.join(modes)} runs on {encoding['input_ids'].shape[0]} texts)"
    runs = progress_bar(modes, desc=desc, enabled=progress, unit="run")
    return [run(model, encoding, patch=patches[mode], mask=patch_mask,
                model_args=tracer_args).logits for mode in runs]


@torch.no_grad()
def loss_recovered(
    text: Any,
    model: Any,
    submodule: Any,
    dictionary: Any = None,
    max_len: int | None = None,
    normalize_batch: bool = False,
    io: str = "out",
    tracer_args: Mapping[str, Any] = TRACER_ARGS,
    *,
    hooks: tuple[HookPoint, ...] | None = None,
    ctx_len: int | None = None,
    patch_mask_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    mean_ablation: bool = False,
    progress: bool = True,
) -> Any:
    """CE of the model clean, with a hook point's value replaced by the dictionary's reconstruction, and with it
    zeroed. Two call forms, told apart by the fourth argument:

    - upstream's `loss_recovered(text, model, submodule, dictionary, max_len=None, normalize_batch=False, io="out",
      tracer_args=...)` returns the tuple `(loss_original, loss_reconstructed, loss_zero)` of scalar tensors.
      submodule: an nnsight Envoy, torch module, dotted path or HookPoint; io: "out", "in" (the input is replaced /
      zeroed) or "in_and_out" / "in_to_out" (a transcoder: output replaced by dictionary(input), or zeroed).
    - this toolkit's `loss_recovered(texts, model, dictionary, hooks, ctx_len=128, patch_mask_fn=None)` (hooks: a
      HookPoint tuple, `(point,)` for SAEs, `(input_side, output_side)` for transcoders; also as `hooks=`) returns
      a dict: ce_clean, ce_patched, ce_zero, frac_recovered, kl_patched (KL(clean || patched)), kl_zero and tokens
      (the (context, target) pairs scored); with `mean_ablation=True` also ce_mean, kl_mean and frac_recovered_mean,
      from a fourth run with the hook point's value replaced by its mean over the batch's patched positions.

    text: texts (tokenized left padded, truncated to max_len / ctx_len) or token ids `[batch, seq]`.
    normalize_batch: the dictionary sees its input scaled to mean norm sqrt(activation_dim), and its output is
    scaled back. patch_mask_fn(encoding) -> [batch, seq] bool picks the positions to patch (default: real tokens).
    tracer_args: keywords for the model's forward (upstream's default: no cache, no attention weights).
    progress: a bar over the runs on stderr when they take more than a few seconds (progress.DELAY).
    """
    hook_tuple = isinstance(dictionary, (tuple, list)) and bool(dictionary) and all(
        isinstance(h, HookPoint) for h in dictionary)
    toolkit_form = hooks is not None or isinstance(dictionary, HookPoint) or hook_tuple
    if toolkit_form:
        hooks = (hooks if hooks is not None else dictionary)
        hooks, dictionary = ((hooks,) if isinstance(hooks, HookPoint) else tuple(hooks)), submodule
        if not hooks or not all(isinstance(h, HookPoint) for h in hooks):
            raise TypeError("hooks must be a tuple of HookPoints, e.g. (point,) or (input_side, output_side)")
        length = ctx_len or max_len or 128
    else:
        if dictionary is None:
            raise TypeError("loss_recovered(text, model, submodule, dictionary, ...) needs a dictionary")
        hooks, length = hook_points_for(model, submodule, io), ctx_len or max_len
    if not 1 <= len(hooks) <= 2:
        raise ValueError(f"expected one hook point, or an (input_side, output_side) pair, got {len(hooks)}")
    encoding = encode_inputs(model, text, length)
    patch_mask = patch_mask_fn(encoding) if patch_mask_fn else encoding["attention_mask"].bool()
    modes = ("clean", "patch", "zero", "mean") if toolkit_form and mean_ablation else ("clean", "patch", "zero")
    logits = _runs(model, encoding, dictionary, hooks, patch_mask, normalize_batch,
                   dict(tracer_args or {}), modes, progress)
    ids, attention = encoding["input_ids"].to(logits[0].device), encoding["attention_mask"].to(logits[0].device)
    losses = []
    for run_logits in logits:
        ce, mask = masked_cross_entropy(run_logits, ids, attention)
        losses.append(ce[mask].mean())
    if not toolkit_form:
        return tuple(losses)
    names = ("clean", "patched", "zero", "mean")[:len(modes)]
    results = {f"ce_{name}": loss.item() for name, loss in zip(names, losses)}
    results["tokens"] = int(mask.sum())  # the (context, target) pairs scored
    for name, run_logits in zip(names[1:], logits[1:]):
        results[f"kl_{name}"] = next_token_kl(logits[0], run_logits)[attention.bool()].mean().item()
    for baseline, suffix in (("zero", ""), ("mean", "_mean")):
        if f"ce_{baseline}" in results:
            results[f"frac_recovered{suffix}"] = recovered_fraction(
                results[f"ce_{baseline}"], results["ce_patched"], results["ce_clean"],
                f"frac_recovered{suffix} (against {baseline} ablation)")
    return results


def _normalized(batch: Any, activation_dim: int) -> Any:
    """Upstream's normalize_batch: x scaled to mean norm sqrt(activation_dim) (a target y by x's factor)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    scale = activation_dim ** 0.5 / x.float().norm(dim=-1).mean()
    return tuple(side * scale for side in batch) if isinstance(batch, (tuple, list)) else batch * scale


@torch.no_grad()
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
    progress: bool = True,
) -> dict[str, float]:
    """Metrics averaged over `n_batches` activation batches (fewer if `activations` runs out first) and, when
    `activations` is an ActivationBuffer over an nnsight model (`pytorch_buffer`'s has no
    traces), loss_recovered averaged over `loss_batches` batches of `batch_size` of its texts
    (default: one after each activation batch, as upstream; more than n_batches follow the last).

    Keys: upstream's l2_loss, l1_loss, l0, frac_variance_explained, cossim, l2_ratio, relative_reconstruction_bias,
    frac_alive (features that fired at least once) and, with a buffer, loss_original, loss_reconstructed, loss_zero,
    frac_recovered; this toolkit's mse, fvu, tokens and, with a buffer, ce_clean, ce_patched, ce_zero (the same CEs),
    ce_mean (mean ablation), kl_patched, kl_zero, kl_mean, frac_recovered_mean (see `reconstruction_metrics`,
    `loss_recovered`); and SAEBench's core names (`core_metrics`: kl_div_score, ce_loss_score, each also against
    mean ablation, explained_variance, l2_norm_in, freq_over_1_percent, dead_fraction, ...; `core_metrics.core_groups`
    groups them as SAEBench does).
    The buffer's own hook points are patched (this toolkit's buffer knows what it read; `io` serves buffers that only
    name a submodule). normalize_batch: upstream's (see `loss_recovered`). device: where the dictionary runs
    (default: where it is).
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

    def add_loss_batch() -> None:
        nonlocal hooks, loss_count, loss_tokens
        try:
            texts = activations.text_batch(batch_size)
        except StopIteration:
            return
        if hooks is None:
            hooks = hook_points_for(activations.model, activations.submodule, io)
        losses = loss_recovered(texts, activations.model, dictionary, hooks=tuple(hooks), ctx_len=max_len,
                                patch_mask_fn=getattr(activations, "token_mask", None),
                                normalize_batch=normalize_batch, tracer_args=tracer_args,
                                mean_ablation=True, progress=False)
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
            batch = _normalized(batch, dictionary.activation_dim)
        metrics = reconstruction_metrics(dictionary, batch)
        fired = metrics["_fired"] if fired is None else fired + metrics["_fired"]
        sums = metrics["_sums"] if sums is None else tuple(a + b for a, b in zip(sums, metrics["_sums"]))
        tokens += metrics["_tokens"]
        for key, value in metrics.items():
            if not key.startswith("_"):
                totals[key] = totals.get(key, 0.0) + value
        count += 1
        bar.update()
        if with_loss and index < loss_batches:  # interleaved as upstream, so the same texts are used
            add_loss_batch()
    for _ in range(loss_batches - min(count, loss_batches) if with_loss else 0):  # more loss batches than batches
        add_loss_batch()
    bar.close()
    if count == 0:
        raise ValueError("activations yielded no batches")
    results = {key: value / count for key, value in totals.items()}
    results["frac_alive"] = (fired > 0).float().mean().item()
    results["tokens"] = tokens
    error_sum, square_sum, vector_sum = sums  # 1 - FVU over all tokens, about their global mean
    variance = square_sum / tokens - (vector_sum / tokens).pow(2).sum()
    results["explained_variance"] = (float("nan") if _without_variance(variance, square_sum / tokens)
                                     else (1 - error_sum / tokens / variance).item())
    results.update(density_metrics(fired.float() / tokens), **weight_metrics(dictionary),
                   total_tokens_eval_sparsity_variance=tokens)
    if with_loss and not loss_count:
        warnings.warn("the buffer's texts ran out before any loss batch: no CE / KL metrics (give it more texts "
                      "than its refresh_batch_size)")
    if loss_count:
        results.update({key: value / loss_count for key, value in loss_totals.items()})
        for upstream_key, key in (("loss_original", "ce_clean"), ("loss_reconstructed", "ce_patched"),
                                  ("loss_zero", "ce_zero")):
            results[upstream_key] = results[key]
        results.update(saebench_names(results), total_tokens_eval_reconstruction=loss_tokens)
    return results


@torch.no_grad()
def feature_density(dictionary: Dictionary, batches: Iterable[Any], progress: bool = True
                    ) -> torch.Tensor:
    """Fraction of tokens on which each feature fires, over the given activation batches:
    `[dict_size]` (with a bar on stderr when that takes more than a few seconds)."""
    fired, tokens = None, 0
    for batch in progress_bar(batches, desc="feature density", enabled=progress, unit="batch"):
        metrics = reconstruction_metrics(dictionary, batch)
        fired = metrics["_fired"] if fired is None else fired + metrics["_fired"]
        tokens += metrics["_tokens"]
    if fired is None:
        raise ValueError("no batches to measure feature density on")
    return fired.float() / tokens


def plot_feature_density(density: torch.Tensor, path: str, title: str = "feature density") -> None:
    """Histogram of log10(firing frequency) as a PNG; dead features (never fired) are counted in the title."""
    plt = pyplot()

    alive = density[density > 0]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(alive.log10().cpu().numpy(), bins=50, color="tab:blue")
    axis.set_xlabel("log10(fraction of tokens the feature fires on)")
    axis.set_ylabel("features")
    axis.set_title(f"{title}: {len(alive)} alive, {int((density == 0).sum())} never fired")
    figure.tight_layout()
    save_figure(figure, path)


@torch.no_grad()
def top_activating_contexts(
    dictionary: Dictionary,
    model: Any,
    point: HookPoint,
    texts: list[str],
    features: list[int],
    n_top: int = 5,
    ctx_len: int = 128,
    batch_size: int = 16,
    window: int = 16,
    remove_bos: bool = True,
    progress: bool = True,
) -> dict[int, list[tuple[float, str]]]:
    """For each feature, its `n_top` strongest activations on `texts` with the preceding `window` tokens as text;
    the activating token is marked «like this». `point` is what the dictionary reads (a transcoder's
    input side). progress: a bar over the text batches on stderr when they take a few seconds."""
    features_tensor = torch.tensor(features, dtype=torch.long)  # long even when empty
    best_values = torch.full((len(features), n_top), -torch.inf)
    best_where: list[list[tuple[int, int, int] | None]] = [[None] * n_top for _ in features]
    encodings = []
    desc = f"top contexts of {len(features)} features on {len(texts)} texts"
    starts = range(0, len(texts), batch_size)
    for start in progress_bar(starts, desc=desc, enabled=progress, unit="batch"):
        encoding = tokenize(model.tokenizer, texts[start : start + batch_size], ctx_len)
        encodings.append(encoding)
        [x] = read_hook_points(model, encoding, [point])
        mask = token_mask(encoding, remove_bos)
        parameter = next(dictionary.parameters())
        codes = dictionary.encode(x.reshape(-1, x.shape[-1]).to(device=parameter.device, dtype=parameter.dtype))
        codes = codes[:, features_tensor.to(codes.device)].float().cpu()  # the running best are kept on the CPU
        codes = codes.reshape(*mask.shape, len(features)).masked_fill(~mask[..., None], -torch.inf)
        for j in range(len(features)):
            values, flat = codes[..., j].flatten().topk(min(n_top, codes[..., j].numel()))
            merged = torch.cat([best_values[j], values])
            where = best_where[j] + [(len(encodings) - 1, int(i) // mask.shape[1], int(i) % mask.shape[1])
                                     for i in flat]
            order = merged.topk(n_top).indices
            best_values[j] = merged[order]
            best_where[j] = [where[i] for i in order]
    results: dict[int, list[tuple[float, str]]] = {}
    for j, feature in enumerate(features):
        rows = []
        for value, place in zip(best_values[j].tolist(), best_where[j]):
            if place is None or value <= 0:
                continue
            batch_index, row, position = place
            ids = encodings[batch_index]["input_ids"][row]
            first_real = int(encodings[batch_index]["attention_mask"][row].int().argmax())  # skip left padding
            before = model.tokenizer.decode(ids[max(first_real, position - window) : position])
            token = model.tokenizer.decode(ids[position : position + 1])
            after = model.tokenizer.decode(ids[position + 1 : position + 4])
            rows.append((value, f"{before}«{token}»{after}".replace("\n", "\\n")))
        results[feature] = rows
    return results


def activation_statistics(x: torch.Tensor) -> dict[str, float]:
    """Summary statistics of a `[n, d]` activation matrix: norms, variance, principal components, outliers."""
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

"""Evaluation: reconstruction metrics on activation batches, `loss_recovered` through nnsight patching, feature
density, top-activating contexts and activation statistics.

loss_recovered runs three traces on the same tokens: clean; with the hook point's value replaced by the
dictionary's reconstruction (a transcoder replaces the output side, computed from the input side); and with that
value zero-ablated. frac_recovered = (CE_zero - CE_patched) / (CE_zero - CE_clean). Cross-entropy is computed here
from the logits and the attention mask (Hugging Face's `labels=` miscounts left-padded batches), and KL is that of
the patched next-token distribution from the clean one, averaged over real tokens. Positions the buffer drops
(padding, and each context's first token when it was built with remove_bos) are left unpatched, since the
dictionary never saw them.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F

from .buffer import ActivationBuffer
from .dictionary import Dictionary
from .files import pyplot, save_figure
from .models import HookPoint
from .tracing import hook_value, logits_or_stop, model_inputs, read_hook_points, read_value, token_mask, tokenize, write


@torch.no_grad()
def reconstruction_metrics(dictionary: Dictionary, batch: Any) -> dict[str, Any]:
    """mse, fvu, cosine similarity, L2 ratio, L0, L1 and per-feature firing counts on one batch."""
    if isinstance(batch, (tuple, list)):
        x, y = batch
    else:
        x = y = batch
    param = next(dictionary.parameters())
    x, y = x.to(param.device, param.dtype), y.to(param.device, param.dtype)
    y_hat, f = dictionary(x, output_features=True)
    error = y - y_hat
    total_variance = (y - y.mean(dim=0)).pow(2).sum()
    active = f != 0
    return {
        "mse": error.pow(2).sum(dim=-1).mean().item(),
        "fvu": (error.pow(2).sum() / total_variance.clamp_min(1e-12)).item(),
        "cossim": F.cosine_similarity(y_hat, y, dim=-1).mean().item(),
        "l2_ratio": (y_hat.norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)).mean().item(),
        "l2_loss": error.norm(dim=-1).mean().item(),
        "l1_loss": f.abs().sum(dim=-1).mean().item(),
        "l0": active.sum(dim=-1).float().mean().item(),
        "_fired": active.sum(dim=0),
        "_tokens": x.shape[0],
    }


def masked_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token next-token CE `[batch, seq-1]` and the mask of real (context, target) pairs."""
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    return ce.view(input_ids.shape[0], -1), attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()


def _apply(dictionary: Dictionary, x: torch.Tensor) -> torch.Tensor:
    param = next(dictionary.parameters())
    flat = x.reshape(-1, x.shape[-1]).to(param.dtype)
    return dictionary(flat).reshape(*x.shape[:-1], -1).to(x.dtype)


@torch.no_grad()
def loss_recovered(
    texts: list[str],
    model: Any,
    dictionary: Dictionary,
    hooks: tuple[HookPoint, ...],
    ctx_len: int = 128,
    patch_mask_fn=None,
) -> dict[str, float]:
    """CE clean / patched with the reconstruction / zero-ablated, the fraction recovered, and KL(clean || patched).

    hooks: `(point,)` for SAEs (the value read is replaced by its reconstruction), `(input_side, output_side)`
    for transcoders. patch_mask_fn(encoding) -> [batch, seq] bool picks the positions to patch (default: real tokens).
    """
    encoding = tokenize(model.tokenizer, texts, ctx_len)
    inputs = model_inputs(encoding)
    patch_mask = (patch_mask_fn(encoding) if patch_mask_fn else encoding["attention_mask"].bool())[..., None]

    def run(mode: str) -> torch.Tensor:
        with model.trace(inputs) as tracer:
            if mode != "clean":
                source_raw = hook_value(model, hooks[0])
                target_raw = hook_value(model, hooks[1]) if len(hooks) == 2 else source_raw
                source, target = read_value(source_raw), read_value(target_raw)
                replacement = torch.zeros_like(target) if mode == "zero" else _apply(dictionary, source)
                new = torch.where(patch_mask.to(target.device), replacement, target)
                write(model, hooks[-1], target_raw, new)
            logits = logits_or_stop(model, tracer, logits=True)
        return logits

    clean, patched, zero = run("clean"), run("patch"), run("zero")
    ids, attention = encoding["input_ids"].to(clean.device), encoding["attention_mask"].to(clean.device)
    results = {}
    for name, logits in (("clean", clean), ("patched", patched), ("zero", zero)):
        ce, mask = masked_cross_entropy(logits, ids, attention)
        results[f"ce_{name}"] = ce[mask].mean().item()
    clean_logp = clean.float().log_softmax(-1)
    patched_logp = patched.float().log_softmax(-1)
    kl = (clean_logp.exp() * (clean_logp - patched_logp)).sum(-1)  # [batch, seq]
    results["kl_patched"] = kl[attention.bool()].mean().item()
    denominator = results["ce_zero"] - results["ce_clean"]
    results["frac_recovered"] = (results["ce_zero"] - results["ce_patched"]) / denominator if denominator else float("nan")
    return results


@torch.no_grad()
def evaluate(
    dictionary: Dictionary,
    activations: ActivationBuffer | Iterable[Any],
    max_len: int = 128,
    batch_size: int = 32,
    n_batches: int = 4,
    loss_batches: int = 1,
    device: str | None = None,
) -> dict[str, float]:
    """Reconstruction metrics over `n_batches` activation batches, plus loss_recovered on `loss_batches` batches of
    `batch_size` texts when `activations` is an ActivationBuffer (it supplies the model, hook points and text).

    Returns mse, fvu, frac_variance_explained, cossim, l2_ratio, l2_loss, l1_loss, l0, frac_alive (features that
    fired at least once in these batches) and, with a buffer, ce_clean, ce_patched, ce_zero, frac_recovered
    (also as upstream's `frac_recovered`) and kl_patched.
    """
    if device is not None:
        dictionary = dictionary.to(device)
    iterator = iter(activations)
    totals: dict[str, float] = {}
    fired, count, tokens = None, 0, 0
    for _ in range(n_batches):
        batch = next(iterator, None)
        if batch is None:
            break
        metrics = reconstruction_metrics(dictionary, batch)
        fired = metrics["_fired"] if fired is None else fired + metrics["_fired"]
        tokens += metrics["_tokens"]
        for key, value in metrics.items():
            if not key.startswith("_"):
                totals[key] = totals.get(key, 0.0) + value
        count += 1
    if count == 0:
        raise ValueError("activations yielded no batches")
    results = {key: value / count for key, value in totals.items()}
    results["frac_variance_explained"] = 1 - results["fvu"]
    results["frac_alive"] = (fired > 0).float().mean().item()
    results["tokens"] = tokens

    if isinstance(activations, ActivationBuffer) and loss_batches > 0:
        loss_totals: dict[str, float] = {}
        done = 0
        for _ in range(loss_batches):
            try:
                texts = activations.text_batch(batch_size)
            except StopIteration:
                break
            for key, value in loss_recovered(texts, activations.model, dictionary, activations.hooks,
                                             ctx_len=max_len, patch_mask_fn=activations.token_mask).items():
                loss_totals[key] = loss_totals.get(key, 0.0) + value
            done += 1
        results.update({key: value / done for key, value in loss_totals.items()} if done else {})
    return results


@torch.no_grad()
def feature_density(dictionary: Dictionary, batches: Iterable[Any]) -> torch.Tensor:
    """Fraction of tokens on which each feature fires, over the given activation batches: `[dict_size]`."""
    fired, tokens = None, 0
    for batch in batches:
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
) -> dict[int, list[tuple[float, str]]]:
    """For each feature, its `n_top` strongest activations on `texts` with the preceding `window` tokens as text;
    the activating token is marked «like this». `point` is what the dictionary reads (a transcoder's input side)."""
    features_tensor = torch.tensor(features)
    best_values = torch.full((len(features), n_top), -torch.inf)
    best_where: list[list[tuple[int, int, int] | None]] = [[None] * n_top for _ in features]
    encodings = []
    for start in range(0, len(texts), batch_size):
        encoding = tokenize(model.tokenizer, texts[start : start + batch_size], ctx_len)
        encodings.append(encoding)
        [x] = read_hook_points(model, encoding, [point])
        mask = token_mask(encoding, remove_bos)
        codes = dictionary.encode(x.reshape(-1, x.shape[-1]).to(next(dictionary.parameters()).dtype))
        codes = codes[:, features_tensor].reshape(*mask.shape, len(features)).masked_fill(~mask[..., None], -torch.inf)
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

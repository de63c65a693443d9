"""`patched_losses`: the model's CE clean, with a hook point's value replaced by the dictionary's
reconstruction and with it ablated, through patched runs (`tracing.run`); `loss_recovered` is
upstream's form of it.

It runs three traces on the same tokens: clean; with the hook point's value replaced by the
dictionary's reconstruction (a transcoder replaces the output side, computed from the input side);
and with that value zero-ablated. frac_recovered = (CE_zero - CE_patched) / (CE_zero - CE_clean). CE
is computed here over the (context, target) pairs of real tokens (HF's `labels=` miscounts left
padding; upstream's ignore_index=pad_token_id also scores a padded row's first token as predicted
from a pad, and skips real tokens equal to the pad id, e.g. EOS). KL is that of the patched
next-token distribution from the clean one, averaged over real tokens. Positions the buffer drops
(padding; each context's first token with remove_bos) are left unpatched: the dictionary never saw
them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from ..core_metrics import recovered_fraction
from ..dictionary import Dictionary, apply_to_values
from ..models import UPSTREAM_IO, HookPoint, get_adapter, submodule_points
from ..progress import progress_bar
from ..tracing import log_prob_kl, run, scored_pairs, tokenize

# upstream's default model keywords for evaluation traces (no KV cache, no attention weights)
TRACER_ARGS: Mapping[str, Any] = MappingProxyType({"use_cache": False, "output_attentions": False})
# the io values loss_recovered takes, to their meaning (upstream: in_and_out = in_to_out)
IO_MODES = UPSTREAM_IO


def encode_inputs(model: Any, inputs: Any, max_len: int | None) -> dict[str, torch.Tensor]:
    """`{"input_ids", "attention_mask"}` for a text, a list of texts (tokenized left padded,
    truncated to max_len), token ids `[batch, seq]` / `[seq]`, or a list of token-id lists (left
    padded with the pad id)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, torch.Tensor):
        ids = inputs[None] if inputs.dim() == 1 else inputs
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError("token ids must be an integer tensor [batch, seq], got "
                             f"{inputs.dtype} {tuple(inputs.shape)}")
        ids = ids[:, :max_len] if max_len else ids
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = list(inputs)
    if inputs and all(isinstance(text, str) for text in inputs):
        return tokenize(model.tokenizer, inputs, max_len)
    if inputs and all(isinstance(row, (list, tuple)) and all(isinstance(t, int) for t in row)
                      for row in inputs):
        rows = [list(row)[:max_len] if max_len else list(row) for row in inputs]
        width, pad = max(map(len, rows)), model.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        return {"input_ids": ids, "attention_mask": mask}
    raise TypeError("inputs must be a text, a list of texts, a tensor of token ids or a list of "
                    f"token-id lists, got {type(inputs).__name__}")


def hook_points_for(model: Any, submodule: Any, io: str) -> tuple[HookPoint, ...]:
    """The hook points that `loss_recovered` reads and patches for upstream's (submodule, io):
    io="out" / "in" the module's output / input; "in_to_out" (upstream: "in_and_out") reads the
    input and patches the output (of one module, or of a pair `(input_side, output_side)`).
    `models.submodule_points` under its evaluation name."""
    return submodule_points(model, submodule, io)


def _runs(model: Any, encoding: dict[str, torch.Tensor], dictionary: Dictionary,
          hooks: tuple[HookPoint, ...], patch_mask: torch.Tensor, normalize_batch: bool,
          tracer_args: Mapping[str, Any], modes: tuple[str, ...] = ("clean", "patch", "zero"),
          progress: bool = False, reuse_prefix: bool = True) -> list[torch.Tensor]:
    """Logits of the clean run, the patched one, the zero-ablated one and (mode "mean") the one with
    the hook point's value replaced by its mean over the patched positions of this batch."""

    def reconstruct(source: torch.Tensor) -> torch.Tensor:
        if normalize_batch:  # as upstream: the source scaled to mean norm sqrt(d), the output back
            kept = source[patch_mask.to(source.device)]
            scale = dictionary.d_in ** 0.5 / kept.float().norm(dim=-1).mean()
            return apply_to_values(dictionary, source * scale) / scale
        return apply_to_values(dictionary, source)

    def mean(target: torch.Tensor) -> torch.Tensor:
        return target[patch_mask.to(target.device)].mean(dim=0).expand_as(target)

    patches = {"clean": {}, "patch": {hooks: reconstruct}, "zero": {hooks[-1]: torch.zeros_like},
               "mean": {hooks[-1]: mean}}
    desc = f"loss recovered ({', '.join(modes)} runs on {encoding['input_ids'].shape[0]} texts)"
    runs = progress_bar(modes, desc=desc, enabled=progress, unit="run")
    # the blocks before the first hooked one compute the same in every run: the first run keeps
    # the last one's output, the others skip them
    blocks = _blocks_before(model, hooks) if reuse_prefix else []
    logits, skip = [], {}
    for mode in runs:
        result = run(model, encoding, patch=patches[mode], mask=patch_mask, model_args=tracer_args,
                     read=[HookPoint(blocks[-1], "output")] if blocks and not skip else (),
                     skip=skip)
        if blocks and not skip:
            skip = dict.fromkeys(blocks, result.values[0])
        logits.append(result.logits)
    return logits


def _blocks_before(model: Any, hooks: tuple[HookPoint, ...]) -> list[str]:
    """The paths of the decoder blocks that run before the first block any of `hooks` is in (none
    when a hook point is outside the blocks, or the model's family is not known)."""
    try:
        layers = get_adapter(model).layers
    except ValueError:
        return []
    first = None
    for point in hooks:
        rest = point.path[len(layers) + 1:] if point.path.startswith(layers + ".") else ""
        index = rest.split(".")[0]
        if not index.isdigit():
            return []
        first = int(index) if first is None else min(first, int(index))
    return [f"{layers}.{i}" for i in range(first or 0)]


def _losses(model: Any, encoding: dict[str, torch.Tensor], dictionary: Any,
            hooks: tuple[HookPoint, ...], patch_mask_fn: Callable | None, normalize_batch: bool,
            tracer_args: Mapping[str, Any], modes: tuple[str, ...], progress: bool, kl: bool = True,
            reuse_prefix: bool = True
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(CE per run, per-token KL(clean || run) `[batch, seq]` of each run after the first (none
    when not `kl`), the mask of scored pairs) of `modes`. Each run's logits are turned into
    log-probabilities once (float32), which both its CE and its KL read."""
    if not 1 <= len(hooks) <= 2:
        raise ValueError("expected one hook point, or an (input_side, output_side) pair, got "
                         f"{len(hooks)}")
    patch_mask = patch_mask_fn(encoding) if patch_mask_fn else encoding["attention_mask"].bool()
    logits = _runs(model, encoding, dictionary, hooks, patch_mask, normalize_batch,
                   dict(tracer_args or {}), modes, progress, reuse_prefix)
    ids = encoding["input_ids"].to(logits[0].device)
    mask = scored_pairs(encoding["attention_mask"].to(logits[0].device))
    targets = ids[:, 1:, None]
    losses, kls = [], []
    clean_logp = clean_p = None
    while logits:  # each run's logits freed as soon as they are read
        logp = logits.pop(0).float().log_softmax(-1)
        losses.append(-logp[:, :-1].gather(-1, targets).squeeze(-1)[mask].mean())
        if not kl:
            continue
        if clean_logp is None:
            clean_logp, clean_p = logp, logp.exp()
        else:
            kls.append(log_prob_kl(clean_logp, logp, clean_p))
    return losses, kls, mask


@torch.no_grad()
def patched_losses(texts: Any, model: Any, dictionary: Any, hooks: Any, ctx_len: int = 128, *,
                   patch_mask_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
                   mean_ablation: bool = False, normalize_batch: bool = False,
                   tracer_args: Mapping[str, Any] = TRACER_ARGS, progress: bool = True,
                   reuse_prefix: bool = True) -> dict[str, float]:
    """The model's CE and KL with the dictionary's reconstruction patched in at `hooks` (a HookPoint
    tuple: `(point,)` for SAEs, `(input_side, output_side)` for transcoders), against the clean and
    the zero-ablated runs: a dict of ce_clean, ce_patched, ce_zero, frac_recovered, kl_patched
    (KL(clean || patched)), kl_zero and tokens (the (context, target) pairs scored); with
    `mean_ablation=True` also ce_mean, kl_mean and frac_recovered_mean, from a fourth run with the
    hook point's value replaced by its mean over the batch's patched positions.

    texts: texts (tokenized left padded, truncated to ctx_len) or token ids `[batch, seq]`.
    patch_mask_fn(encoding) -> [batch, seq] bool picks the positions to patch (default: real
    tokens). normalize_batch: the dictionary sees its input scaled to mean norm
    sqrt(d_in), and its output is scaled back. tracer_args: keywords for the model's
    forward. progress: a bar over the runs when they take more than a few seconds. reuse_prefix:
    the decoder blocks before the first hooked one run once, in the clean run; the other runs
    skip them and start from the output the clean run gave (False: every run is a whole forward).
    """
    hooks = (hooks,) if isinstance(hooks, HookPoint) else tuple(hooks)
    if not hooks or not all(isinstance(h, HookPoint) for h in hooks):
        raise TypeError("hooks must be a tuple of HookPoints, e.g. (point,) or (input_side, "
                        "output_side)")
    modes = ("clean", "patch", "zero", "mean") if mean_ablation else ("clean", "patch", "zero")
    encoding = encode_inputs(model, texts, ctx_len)
    losses, kls, mask = _losses(model, encoding, dictionary, hooks, patch_mask_fn,
                                normalize_batch, tracer_args, modes, progress,
                                reuse_prefix=reuse_prefix)
    names = ("clean", "patched", "zero", "mean")[:len(modes)]
    results = {f"ce_{name}": loss.item() for name, loss in zip(names, losses)}
    results["tokens"] = int(mask.sum())  # the (context, target) pairs scored
    real = encoding["attention_mask"].bool().to(mask.device)
    for name, kl in zip(names[1:], kls):
        results[f"kl_{name}"] = kl[real].mean().item()
    for baseline, suffix in (("zero", ""), ("mean", "_mean")):
        if f"ce_{baseline}" in results:
            results[f"frac_recovered{suffix}"] = recovered_fraction(
                results[f"ce_{baseline}"], results["ce_patched"], results["ce_clean"],
                f"frac_recovered{suffix} (against {baseline} ablation)")
    return results


@torch.no_grad()
def loss_recovered(text: Any, model: Any, submodule: Any, dictionary: Any,
                   max_len: int | None = None, normalize_batch: bool = False, io: str = "out",
                   tracer_args: Mapping[str, Any] = TRACER_ARGS
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upstream's `loss_recovered`: `(loss_original, loss_reconstructed, loss_zero)`, the model's CE
    (scalar tensors) clean, with `submodule`'s value replaced by the dictionary's reconstruction,
    and with it zeroed. submodule: an nnsight Envoy, torch module, dotted path or HookPoint; io:
    "out", "in" (the input is replaced / zeroed) or "in_and_out" / "in_to_out" (a transcoder: the
    output replaced by dictionary(input), or zeroed). text: texts (tokenized left padded, truncated
    to max_len) or token ids `[batch, seq]`. This toolkit's richer form over hook points is
    `patched_losses`."""
    points = dictionary if isinstance(dictionary, (tuple, list)) else (dictionary,)
    if all(isinstance(point, HookPoint) for point in points):
        raise TypeError("loss_recovered(text, model, submodule, dictionary, ...) is upstream's "
                        "form; with hook points use patched_losses(texts, model, dictionary, "
                        "hooks)")
    hooks = hook_points_for(model, submodule, io)
    losses = _losses(model, encode_inputs(model, text, max_len), dictionary, hooks, None,
                     normalize_batch, tracer_args, ("clean", "patch", "zero"), False, kl=False)[0]
    return tuple(losses)

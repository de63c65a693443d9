"""`loss_recovered`: the model's CE clean, with a hook point's value replaced by the dictionary's
reconstruction and with it ablated, through patched runs (`tracing.run`).

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
from ..models import HookPoint, resolve_hook
from ..progress import progress_bar
from ..tracing import masked_cross_entropy, next_token_kl, run, tokenize

# upstream's default model keywords for evaluation traces (no KV cache, no attention weights)
TRACER_ARGS: Mapping[str, Any] = MappingProxyType({"use_cache": False, "output_attentions": False})
# upstream: in_and_out
IO_MODES = {"out": "out", "in": "in", "in_to_out": "in_to_out", "in_and_out": "in_to_out"}


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
    input and patches the output (of one module, or of a pair `(input_side, output_side)`)."""
    if io not in IO_MODES:
        raise ValueError(f"io must be one of {sorted(IO_MODES)}, got {io!r}")
    io = IO_MODES[io]
    if io == "in_to_out":
        source, target = (submodule if isinstance(submodule, (tuple, list))
                          else (submodule, submodule))
        return resolve_hook(model, source, "input"), resolve_hook(model, target, "output")
    return (resolve_hook(model, submodule, "input" if io == "in" else "output"),)


def _runs(model: Any, encoding: dict[str, torch.Tensor], dictionary: Dictionary,
          hooks: tuple[HookPoint, ...], patch_mask: torch.Tensor, normalize_batch: bool,
          tracer_args: Mapping[str, Any], modes: tuple[str, ...] = ("clean", "patch", "zero"),
          progress: bool = False
          ) -> list[torch.Tensor]:
    """Logits of the clean run, the patched one, the zero-ablated one and (mode "mean") the one with
    the hook point's value replaced by its mean over the patched positions of this batch."""

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
    """CE of the model clean, with a hook point's value replaced by the dictionary's reconstruction,
    and with it zeroed. Two call forms, told apart by the fourth argument:

    - upstream's `loss_recovered(text, model, submodule, dictionary, max_len=None,
      normalize_batch=False, io="out", tracer_args=...)` returns the tuple `(loss_original,
      loss_reconstructed, loss_zero)` of scalar tensors. submodule: an nnsight Envoy, torch module,
      dotted path or HookPoint; io: "out", "in" (the input is replaced / zeroed) or "in_and_out" /
      "in_to_out" (a transcoder: output replaced by dictionary(input), or zeroed).
    - this toolkit's `loss_recovered(texts, model, dictionary, hooks, ctx_len=128,
      patch_mask_fn=None)` (hooks: a HookPoint tuple, `(point,)` for SAEs,
      `(input_side, output_side)` for transcoders; also as `hooks=`) returns a dict: ce_clean,
      ce_patched, ce_zero, frac_recovered, kl_patched (KL(clean || patched)), kl_zero and tokens
      (the (context, target) pairs scored); with `mean_ablation=True` also ce_mean, kl_mean and
      frac_recovered_mean, from a fourth run with the hook point's value replaced by its mean over
      the batch's patched positions.

    text: texts (tokenized left padded, truncated to max_len / ctx_len) or token ids `[batch, seq]`.
    normalize_batch: the dictionary sees its input scaled to mean norm sqrt(activation_dim), and its
    output is scaled back. patch_mask_fn(encoding) -> [batch, seq] bool picks the positions to patch
    (default: real tokens).
    tracer_args: keywords for the model's forward (upstream's default: no cache, no attention
    weights).
    progress: a bar over the runs on stderr when they take more than a few seconds (progress.DELAY).
    """
    hook_tuple = isinstance(dictionary, (tuple, list)) and bool(dictionary) and all(
        isinstance(h, HookPoint) for h in dictionary)
    toolkit_form = hooks is not None or isinstance(dictionary, HookPoint) or hook_tuple
    if toolkit_form:
        hooks = (hooks if hooks is not None else dictionary)
        hooks, dictionary = ((hooks,) if isinstance(hooks, HookPoint) else tuple(hooks)), submodule
        if not hooks or not all(isinstance(h, HookPoint) for h in hooks):
            raise TypeError("hooks must be a tuple of HookPoints, e.g. (point,) or (input_side, "
                            "output_side)")
        length = ctx_len or max_len or 128
    else:
        if dictionary is None:
            raise TypeError("loss_recovered(text, model, submodule, dictionary, ...) needs a "
                            "dictionary")
        hooks, length = hook_points_for(model, submodule, io), ctx_len or max_len
    if not 1 <= len(hooks) <= 2:
        raise ValueError("expected one hook point, or an (input_side, output_side) pair, got "
                         f"{len(hooks)}")
    encoding = encode_inputs(model, text, length)
    patch_mask = patch_mask_fn(encoding) if patch_mask_fn else encoding["attention_mask"].bool()
    modes = (("clean", "patch", "zero", "mean") if toolkit_form and mean_ablation
             else ("clean", "patch", "zero"))
    logits = _runs(model, encoding, dictionary, hooks, patch_mask, normalize_batch,
                   dict(tracer_args or {}), modes, progress)
    ids, attention = (encoding["input_ids"].to(logits[0].device),
                      encoding["attention_mask"].to(logits[0].device))
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


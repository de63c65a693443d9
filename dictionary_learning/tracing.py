"""The door to nnsight traces: how texts become a model's inputs, and how a hook point is read or written inside a
trace. `buffer.py` and `evaluation.py` run their traces through these functions; the SCAE wing's own traces
(`scae/tracing.py`) use them too.

    encoding = tokenize(model.tokenizer, texts, ctx_len)          # left padded, truncated to ctx_len
    [x] = read_hook_points(model, encoding, [point])              # [batch, seq, d], the trace stopped after it
    with model.trace(model_inputs(encoding)) as tracer:           # or by hand, inside a trace:
        x = read(model, point)                                    # read (element 0 of a tuple value)
        old = hook_value(model, point)                            # or the value as it comes, tuples included,
        write(model, point, old, new)                             # to write it (other tuple elements kept)
        logits = logits_or_stop(model, tracer, logits=True)       # the logits, or stop after the last read

nnsight runs a trace's body against the model's execution: modules must be reached in execution order.
`masked_cross_entropy` and `next_token_kl` turn a trace's logits into the per-token losses that evaluation,
end-to-end training and SCAE fine-tuning share; `release_traces` frees finished traces at once.
"""

from __future__ import annotations

import gc

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .models import HookPoint, execution_key


def tokenize(tokenizer: Any, texts: list[str], ctx_len: int) -> dict[str, torch.Tensor]:
    """Texts as the toolkit feeds them to models: left padded (nnsight's tokenizer setting), truncated to ctx_len."""
    encoding = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=ctx_len)
    return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}


def model_inputs(encoding: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trace inputs for a left-padded batch: positions count real tokens only, so a padded text gets the positions
    it has unpadded (which matters for learned position embeddings)."""
    attention_mask = encoding["attention_mask"]
    return {
        "input_ids": encoding["input_ids"],
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
    }


def drop_first_tokens(mask: torch.Tensor) -> torch.Tensor:
    """A copy of a left-padded `[batch, seq]` token mask without each row's first real token."""
    mask = mask.clone()
    mask[torch.arange(mask.shape[0]), mask.int().argmax(dim=1)] = False
    return mask


def token_mask(encoding: dict[str, torch.Tensor], remove_bos: bool = False) -> torch.Tensor:
    """`[batch, seq]` bool: the real tokens, minus each context's first one with `remove_bos` (the BOS where the
    tokenizer adds one; otherwise the first token, which models without BOS treat as an attention sink)."""
    mask = encoding["attention_mask"].bool()
    return drop_first_tokens(mask) if remove_bos else mask


def masked_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token CE `[batch, seq-1]` and the mask of real (context, target) pairs."""
    ids, attention = input_ids.to(logits.device), attention_mask.to(logits.device)
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return ce.view(ids.shape[0], -1), attention[:, 1:].bool() & attention[:, :-1].bool()


def next_token_kl(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(clean || other) of the next-token distributions `[batch, seq]` (differentiable in `other`)."""
    clean_logp, other_logp = clean_logits.float().log_softmax(-1), other_logits.float().log_softmax(-1)
    return (clean_logp.exp() * (clean_logp - other_logp)).sum(-1)


def read_value(value: Any) -> torch.Tensor:
    """A module input / output as a tensor (element 0 of tuples)."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def hook_value(model: Any, point: HookPoint) -> Any:
    """Inside a trace: the hook point's module input or output as nnsight gives it (tuples included)."""
    envoy = model.get(point.path)
    return envoy.input if point.io == "input" else envoy.output


def read(model: Any, point: HookPoint) -> torch.Tensor:
    """Inside a trace: the hook point's value as a tensor (element 0 of tuples)."""
    return read_value(hook_value(model, point))


def write(model: Any, point: HookPoint, old: Any, new: torch.Tensor) -> None:
    """Inside a trace: replace the hook point's value by `new`; of a tuple value (read before as `old`), only
    element 0 is replaced."""
    envoy = model.get(point.path)
    value = (new, *old[1:]) if isinstance(old, tuple) else new
    if point.io == "input":
        envoy.input = value
    else:
        envoy.output = value


def logits_or_stop(model: Any, tracer: Any, logits: bool) -> Any:
    """Inside a trace, after the last hook point it needs: the saved logits, or (logits=False) stop the model
    there and return None."""
    if logits:
        return model.output.logits.save()
    tracer.stop()
    return None


@torch.no_grad()
def read_hook_points(model: Any, encoding: dict[str, torch.Tensor], points: Sequence[HookPoint],
                     remote: bool = False) -> list[torch.Tensor]:
    """The values `[batch, seq, d]` at `points` (in the order given) from one trace over `encoding`, which stops
    right after the last of them. `remote=True` runs the trace on NDIF through nnsight's remote execution."""
    order = sorted(range(len(points)), key=lambda i: execution_key(model, points[i]))
    saved: list[Any] = [None] * len(points)
    with model.trace(model_inputs(encoding), **({"remote": True} if remote else {})) as tracer:
        for i in order:  # modules must be reached in execution order within one trace
            saved[i] = hook_value(model, points[i]).save()
        logits_or_stop(model, tracer, logits=False)
    values = [read_value(value) for value in saved]
    del tracer
    release_traces()
    return values


def release_traces() -> None:
    """Free finished traces now. A finished nnsight trace is garbage in reference cycles that still hold every value
    it saved; Python's cycle collector runs by object counts, not bytes, so a buffer over many hook points grew by
    gigabytes per refill until it ran out of memory (30 SmolLM2 MLP pairs: 24 GB in 300 steps). The traces' objects
    are young: collecting the young generations frees them in ~0.1 ms (a full collection takes ~200 ms with
    transformers loaded)."""
    gc.collect(1)

"""The door to nnsight traces: how texts become a model's inputs, and every trace the package
runs.

    encoding = tokenize(model.tokenizer, texts, ctx_len)  # left padded, truncated to ctx_len
    [x] = read_hook_points(model, encoding, [point])      # [batch, seq, d], stopped after it
    rows = collect(model, encoding, points, TokenFilter(remove_bos=True))  # kept rows [n, d]
    values, logits = run(model, encoding, read=[point], patch={point: fn}, mask=mask)

`run` is the one door for patched runs: a patch function gets a hook point's value and returns
its replacement; tuples, the position mask, execution order and freeing the finished trace are
handled there. Inside a trace written by hand (the SCAE wing's record pass): `read`, `hook_value`
and `write` a hook point, `logits_or_stop` at the end; nnsight runs a trace's body against the
model's execution, so modules must be reached in execution order. `masked_cross_entropy` and
`next_token_kl` turn logits into the per-token losses that evaluation, end-to-end training and
SCAE fine-tuning share; `release_traces` frees finished traces at once.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .models import HookPoint, execution_key


def tokenize(tokenizer: Any, texts: list[str], ctx_len: int, add_special_tokens: bool = True
             ) -> dict[str, torch.Tensor]:
    """Texts as the toolkit feeds them to models: left padded (nnsight's tokenizer setting),
    truncated to ctx_len; add_special_tokens=False leaves out the ones the tokenizer adds (BOS)."""
    encoding = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                         max_length=ctx_len, add_special_tokens=add_special_tokens)
    return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}


def model_inputs(encoding: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trace inputs for a left-padded batch: positions count real tokens only, so a padded text gets
    the positions it has unpadded (which matters for learned position embeddings)."""
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
    """`[batch, seq]` bool: the real tokens, minus each context's first one with `remove_bos` (the
    BOS where the tokenizer adds one; otherwise the first token, which models without BOS treat as
    an attention sink)."""
    mask = encoding["attention_mask"].bool()
    return drop_first_tokens(mask) if remove_bos else mask


@dataclass
class FilterCounts:
    """What a collector's `TokenFilter` dropped, summed over every batch it saw: real tokens (not
    padding) and their squared norms at the first hook point. `first`: each context's first token,
    dropped by remove_bos (the attention sink); `outliers`: tokens the norm filter dropped, of which
    `outliers_first` sat at a context's first position (only without remove_bos)."""

    tokens: int = 0
    first: int = 0
    outliers: int = 0
    outliers_first: int = 0
    square_norm: float = 0.0
    first_square_norm: float = 0.0
    outlier_square_norm: float = 0.0

    def add(self, real: torch.Tensor, first: torch.Tensor, outlier: torch.Tensor,
            square_norms: torch.Tensor) -> None:
        """One batch: `[batch, seq]` masks of its real tokens, the first tokens remove_bos dropped
        and the outliers the norm filter dropped; `square_norms` `[batch, seq]`."""
        square_norms = square_norms.double()
        self.tokens += int(real.sum())
        self.first += int(first.sum())
        self.outliers += int(outlier.sum())
        self.outliers_first += int((outlier & drop_first_tokens(real).logical_not() & real).sum())
        self.square_norm += float(square_norms[real].sum())
        self.first_square_norm += float(square_norms[first].sum())
        self.outlier_square_norm += float(square_norms[outlier].sum())

    def summary(self) -> dict[str, Any]:
        """The counts with each dropped group's share: the first tokens' of every real token's
        squared norm; the outliers' of the tokens the norm filter saw (the real ones less the first
        tokens remove_bos dropped), in count and in squared norm."""
        seen = max(self.tokens - self.first, 1)
        return {"tokens_seen": self.tokens,
                "first_tokens_dropped": self.first,
                "first_tokens_square_norm_share": self.first_square_norm / (self.square_norm or 1),
                "outliers_dropped": self.outliers,
                "outliers_at_first_position": self.outliers_first,
                "outliers_token_share": self.outliers / seen,
                "outliers_square_norm_share": self.outlier_square_norm
                / ((self.square_norm - self.first_square_norm) or 1)}

    def line(self) -> str:
        """A sentence saying what was dropped."""
        shares = self.summary()
        return (f"{self.tokens:,} tokens read: {self.first:,} first-position tokens (the attention "
                f"sink) dropped, {shares['first_tokens_square_norm_share']:.1%} of their squared "
                f"norm; of the rest, {self.outliers:,} outlier-norm tokens dropped "
                f"({self.outliers_first:,} first in their context), "
                f"{shares['outliers_square_norm_share']:.1%} of the rest's squared norm")


@dataclass(frozen=True)
class TokenFilter:
    """Which tokens of a batch a collector keeps: the real ones (not padding), without each
    context's first token with `remove_bos`, and (with `max_norm_multiple`) without the tokens whose
    norm at any hook point exceeds that multiple of the median norm there over the batch's real kept
    tokens. A token dropped at one hook point is dropped at all of them, so the rows of every hook
    point (both sides of an in_to_out pair) stay aligned. `keep(encoding, values)`, with values
    `[batch, seq, ...]` per hook point, returns the kept rows `[n_kept, ...]` of each."""

    remove_bos: bool = False
    max_norm_multiple: float | None = None

    def mask(self, encoding: dict[str, torch.Tensor], values: Sequence[torch.Tensor] = (),
             counts: FilterCounts | None = None) -> torch.Tensor:
        """`[batch, seq]` bool: the kept tokens (without values, the norm filter is left out).
        counts: what was dropped is added to it."""
        mask = token_mask(encoding, self.remove_bos)
        if not values:
            return mask
        mask = mask.to(values[0].device)
        kept, norms = mask, None
        if self.max_norm_multiple is not None and mask.any():
            for value in values:  # each hook point's median over the same tokens
                point_norms = value.float().flatten(2).norm(dim=-1)  # [batch, seq]
                norms = point_norms if norms is None else norms
                kept = kept & (point_norms <= point_norms[mask].median() * self.max_norm_multiple)
        if counts is not None:
            if norms is None:
                norms = values[0].float().flatten(2).norm(dim=-1)
            real = encoding["attention_mask"].bool().to(mask.device)
            counts.add(real, real & ~mask, mask & ~kept, norms.square())
        return kept

    def __call__(self, encoding: dict[str, torch.Tensor], values: Sequence[torch.Tensor],
                 counts: FilterCounts | None = None) -> list[torch.Tensor]:
        mask = self.mask(encoding, values, counts)
        return [value[mask] for value in values]


Keep = Callable[[dict[str, torch.Tensor], Sequence[torch.Tensor]], list[torch.Tensor]]


def masked_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token CE `[batch, seq-1]` and the mask of real (context, target) pairs."""
    ids = input_ids.to(logits.device)
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                         reduction="none")
    return ce.view(ids.shape[0], -1), scored_pairs(attention_mask.to(logits.device))


def scored_pairs(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[batch, seq-1]` bool: the (context, target) pairs of real tokens that next-token CE
    scores."""
    return attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()


def next_token_kl(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(clean || other) of the next-token distributions `[batch, seq]` (differentiable
    in `other`)."""
    return log_prob_kl(clean_logits.float().log_softmax(-1), other_logits.float().log_softmax(-1))


def log_prob_kl(clean_logp: torch.Tensor, other_logp: torch.Tensor,
                clean_p: torch.Tensor | None = None) -> torch.Tensor:
    """`next_token_kl` from log-probabilities (`clean_p`: `clean_logp.exp()`, when the caller
    compares several runs to one clean run)."""
    clean_p = clean_logp.exp() if clean_p is None else clean_p
    return (clean_p * (clean_logp - other_logp)).sum(-1)


def read_value(value: Any) -> torch.Tensor:
    """A module input / output as a tensor (element 0 of tuples)."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def hook_value(model: Any, point: HookPoint) -> Any:
    """Inside a trace: the hook point's module input or output as nnsight gives it
    (tuples included)."""
    envoy = model.get(point.path)
    return envoy.input if point.io == "input" else envoy.output


def read(model: Any, point: HookPoint) -> torch.Tensor:
    """Inside a trace: the hook point's value as a tensor (element 0 of tuples)."""
    return read_value(hook_value(model, point))


def write(model: Any, point: HookPoint, old: Any, new: torch.Tensor) -> None:
    """Inside a trace: replace the hook point's value by `new`; of a tuple value (read before
    as `old`), only element 0 is replaced."""
    envoy = model.get(point.path)
    value = (new, *old[1:]) if isinstance(old, tuple) else new
    if point.io == "input":
        envoy.input = value
    else:
        envoy.output = value


def logits_or_stop(model: Any, tracer: Any, logits: bool) -> Any:
    """Inside a trace, after the last hook point it needs: the saved logits, or (logits=False) stop
    the model there and return None."""
    if logits:
        return model.output.logits.save()
    tracer.stop()
    return None


class TraceResult(NamedTuple):
    """What `run` returns: the values read at its `read` points (element 0 of tuples), in the
    order asked, and the logits (None where the pass stopped after its last hook point)."""

    values: list[torch.Tensor]
    logits: torch.Tensor | None


PatchKey = HookPoint | tuple[HookPoint, ...]
Patch = Callable[[torch.Tensor], torch.Tensor]


def _patch_sides(key: PatchKey) -> tuple[HookPoint, HookPoint]:
    """A patch key as (source, target): a hook point patches itself from its own value; a pair
    `(input_side, output_side)` (a transcoder's) patches its output side from its input side."""
    sides = (key,) if isinstance(key, HookPoint) else tuple(key)
    if not 1 <= len(sides) <= 2 or not all(isinstance(side, HookPoint) for side in sides):
        raise TypeError(f"a patch key is a HookPoint or a (source, target) pair, got {key!r}")
    return sides[0], sides[-1]


def run(model: Any, encoding: dict[str, torch.Tensor], read: Sequence[HookPoint] = (),
        patch: Mapping[PatchKey, Patch] | None = None, logits: bool = True, grad: bool = False,
        remote: bool = False, *, mask: torch.Tensor | None = None,
        model_args: Mapping[str, Any] | None = None,
        skip: Mapping[str, Any] | None = None) -> TraceResult:
    """One pass of the model over `encoding`, in one nnsight trace: the values at `read` with
    `patch` applied, and the logits (logits=False: the pass stops after its last hook point).

    patch: `{point: fn}` replaces the point's value by `fn(value)`; `{(source, target): fn}`
    replaces the target's value by `fn(source's value)` (a transcoder's output side from its input
    side). `fn` takes and returns a tensor `[batch, seq, d]`, element 0 of a tuple value (the
    tuple's other elements are kept). mask: `[batch, seq]` bool, the positions patched; elsewhere
    a patched point keeps its value. A value read is the model's at that point, before any patch
    there. grad=False runs without autograd; grad=True leaves autograd as the caller has it, so the
    logits are differentiable in whatever the patch functions use. remote=True runs the trace on
    NDIF (nnsight's remote execution); model_args go to the model's forward (`use_cache=False`).
    skip: `{module path: value}`, modules that do not run, `value` standing for their output
    (nnsight's `skip`): e.g. the decoder blocks before the first hook point, with what an earlier
    pass over the same tokens gave, so a second patched pass does not recompute them; they must
    all run before the first hook point.
    The points are reached in execution order, as nnsight needs, and the trace is freed at once."""
    read = list(read)
    patches: dict[tuple[str, str], tuple[HookPoint, Patch]] = {}
    points = {(point.path, point.io): point for point in read}
    for key, function in (patch or {}).items():
        source, target = _patch_sides(key)
        if (target.path, target.io) in patches:
            raise ValueError(f"{target} is patched twice: give one function per hook point")
        patches[(target.path, target.io)] = (source, function)
        points.setdefault((source.path, source.io), source)
        points.setdefault((target.path, target.io), target)
    order = sorted(points.items(), key=lambda item: execution_key(model, item[1]))
    steps = [(key, point, [i for i, r in enumerate(read) if (r.path, r.io) == key],
              patches.get(key)) for key, point in order]
    for path in skip or {}:
        if steps and execution_key(model, HookPoint(path, "output")) > execution_key(model,
                                                                                     steps[0][1]):
            raise ValueError(f"skip: {path} runs after the hook point {steps[0][1]}: only modules "
                             "that run before every hook point can be skipped")
    options = {**(model_args or {}), **({"remote": True} if remote else {})}
    saved: list[Any] = [None] * len(read)
    seen: dict[tuple[str, str], torch.Tensor] = {}
    output = None  # stays None where the trace stops after its last hook point
    with contextlib.nullcontext() if grad else torch.no_grad():
        with model.trace(model_inputs(encoding), **options) as tracer:
            for path, value in (skip or {}).items():
                model.get(path).skip(value)
            for step in steps:  # modules must be reached in execution order
                _visit(model, step, seen, saved, mask)
            output = logits_or_stop(model, tracer, logits)
    values = [read_value(value) for value in saved]
    seen.clear()
    del tracer
    release_traces()
    return TraceResult(values, output)


def _visit(model: Any, step: tuple, seen: dict[tuple[str, str], torch.Tensor], saved: list[Any],
           mask: torch.Tensor | None) -> None:
    """Inside `run`'s trace, at one hook point: save its value where it is read, write its patch."""
    key, point, reads, patched = step
    raw = hook_value(model, point)
    seen[key] = read_value(raw)
    for i in reads:
        saved[i] = raw.save()
    if patched is not None:
        source, function = patched
        new, old = function(seen[(source.path, source.io)]), seen[key]
        if mask is not None:
            new = torch.where(mask[..., None].to(old.device), new, old)
        write(model, point, raw, new)


def read_hook_points(model: Any, encoding: dict[str, torch.Tensor], points: Sequence[HookPoint],
                     remote: bool = False) -> list[torch.Tensor]:
    """The values `[batch, seq, d]` at `points` (in the order given) from one trace over `encoding`,
    which stops right after the last of them. `remote=True` runs the trace on NDIF through nnsight's
    remote execution."""
    return run(model, encoding, read=points, logits=False, remote=remote).values


def collect(model: Any, encoding: dict[str, torch.Tensor], points: Sequence[HookPoint],
            keep: Keep, remote: bool = False) -> list[torch.Tensor]:
    """The collector's nnsight reader: the kept token rows `[n_kept, ...]` of each hook point on
    `encoding`, from one trace stopped after the last of them; `keep(encoding, values)` (a
    `TokenFilter`) chooses them. `pytorch_buffer.collect` reads the same rows with PyTorch hooks."""
    return keep(encoding, run(model, encoding, read=points, logits=False, remote=remote).values)


def release_traces() -> None:
    """Free finished traces now. A finished nnsight trace is garbage in reference cycles that still
    hold every value it saved; Python's cycle collector runs by object counts, not bytes, so a
    buffer over many hook points grew by gigabytes per refill until it ran out of memory (30 SmolLM2
    MLP pairs: 24 GB in 300 steps). The traces' objects are young: collecting the young generations
    frees them in ~0.1 ms (a full collection takes ~200 ms with transformers loaded)."""
    gc.collect(1)

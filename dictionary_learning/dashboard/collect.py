"""One streaming pass over texts for the dashboard: per feature, exact firing counts and maxima, the
running top-N activating tokens and a uniform random sample of its activations (a reservoir), each
kept example with the window of tokens around it and the feature's activations there. Memory is
bounded by the number of features times (top_examples + sample_examples) windows plus `reservoir`
values, whatever the number of tokens read; everything is kept on the CPU.

Sampling: every non-zero activation gets a random key in [0, 1); per feature the rows with the
smallest keys are kept, which is a uniform sample without replacement of its activations (the
examples are the first `sample_examples` of the `reservoir` values, so a subset of them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import integer
from ..checks import options as check_options
from ..dictionary import Dictionary
from ..models import HookPoint
from ..progress import progress_bar
from ..tracing import TokenFilter, collect, tokenize

BEFORE, AFTER = 24, 8  # tokens shown before and after an example's activating token


@dataclass
class FeatureStatistics:
    """What one pass over texts measured for `features` (indices into the dictionary), on `tokens`
    tokens.

    `fired`, `max_value`: `[n]` exact over all tokens. `top` and `sample`: example tables (dicts of
    tensors, one row per example: feature (position in `features`), key, value, text, position, ids
    `[W]`, acts `[W]`; ids are -1 outside the text). `values`: the reservoir (feature, key, value)
    of at most `reservoir` activations per feature."""

    features: list[int]
    tokens: int
    texts: int
    fired: torch.Tensor
    max_value: torch.Tensor
    top: dict[str, torch.Tensor]
    sample: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]

    @property
    def density(self) -> torch.Tensor:
        """Fraction of the tokens read on which each feature fired (non-zero activation): `[n]`."""
        return self.fired.double() / max(self.tokens, 1)


def keep_smallest(table: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """Per feature (`table["feature"]`), the `keep` rows with the smallest `table["key"]` (ties: the
    earlier row)."""
    feature, key = table["feature"], table["key"]
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(feature[order], stable=True)]
    grouped = feature[order]
    # position inside the feature's group
    rank = torch.arange(len(order)) - torch.searchsorted(grouped, grouped)
    chosen = order[rank < keep]
    return {name: value[chosen] for name, value in table.items()}


def _concat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([a[name], b[name]]) for name in a}


def _empty(window: int, with_windows: bool) -> dict[str, torch.Tensor]:
    table = {"feature": torch.empty(0, dtype=torch.long), "key": torch.empty(0),
             "value": torch.empty(0)}
    if with_windows:
        table.update(text=torch.empty(0, dtype=torch.long),
                     position=torch.empty(0, dtype=torch.long),
                     ids=torch.empty(0, window, dtype=torch.int32), acts=torch.empty(0, window))
    return table


def _windows(table: dict[str, torch.Tensor], codes: torch.Tensor, input_ids: torch.Tensor,
             real: torch.Tensor, row: torch.Tensor, text_offset: int) -> dict[str, torch.Tensor]:
    """The rows of `table` (of one batch: `row` its batch row) with their windows of token ids and
    activations."""
    offsets = torch.arange(-BEFORE, AFTER + 1)
    where = table["position"][:, None] + offsets  # [n, W]
    inside = (where >= 0) & (where < codes.shape[1])
    where = where.clamp(0, codes.shape[1] - 1)
    rows = row[:, None].expand_as(where)
    inside &= real[rows, where]
    ids = torch.where(inside, input_ids[rows, where], -1).to(torch.int32)
    acts = torch.where(inside, codes[rows, where, table["feature"][:, None]], 0.0)
    return {**table, "text": row + text_offset, "ids": ids, "acts": acts}


def _batches(texts: Iterable[str], batch_texts: int, max_texts: int | None) -> Iterator[list[str]]:
    batch: list[str] = []
    for count, text in enumerate(texts):
        if max_texts is not None and count >= max_texts:
            break
        batch.append(text)
        if len(batch) == batch_texts:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class StatisticsConfig:
    """How `feature_statistics` reads text and what it keeps per feature."""

    tokens: int = 32768
    """stop once this many tokens (positions kept, see `remove_bos`) are read"""
    max_texts: int | None = None
    """or once this many texts are read (None: as many as `tokens` needs)"""
    ctx_len: int = 128
    """tokens per text (longer texts are truncated)"""
    batch_texts: int = 16
    """texts per trace"""
    remove_bos: bool = True
    """leave each text's first token out, as the buffer does (still shown in windows, with
    activation 0)"""
    top_examples: int = 10
    """the strongest examples kept per feature"""
    sample_examples: int = 48
    """examples per feature drawn uniformly from its activations (the first of the reservoir)"""
    reservoir: int = 1024
    """activation values per feature kept as a uniform random sample (at least `sample_examples`)"""
    seed: int = 0
    """seeds the random sample"""
    progress: bool = True
    """a bar on stderr over the tokens once the pass takes a few seconds (progress.DELAY)"""

    def __post_init__(self) -> None:
        for name in ("tokens", "ctx_len", "batch_texts", "top_examples", "sample_examples",
                     "reservoir"):
            integer(name, getattr(self, name))
        if self.sample_examples > self.reservoir:
            raise ValueError(f"sample_examples={self.sample_examples} must not exceed "
                             f"reservoir={self.reservoir}")


@torch.no_grad()
def feature_statistics(dictionary: Dictionary, model: Any, point: HookPoint, texts: Iterable[str],
                       features: list[int], config: StatisticsConfig | None = None,
                       **options: Any) -> FeatureStatistics:
    """Read `point` (what the dictionary encodes: a transcoder's input side) on `texts` until
    `tokens` tokens (or `max_texts` texts) are read, `batch_texts` texts (truncated to `ctx_len`
    tokens) per trace, and keep per feature of `features` what `FeatureStatistics` holds. Positions
    the buffer drops (padding; each text's first token with `remove_bos`) are not counted; their
    tokens are still shown in windows, with activation 0. `options`: the fields of
    `StatisticsConfig` (or pass one as `config`; options given as well replace its fields)."""
    config = check_options(StatisticsConfig, config, options, "feature_statistics")
    if not features:
        raise ValueError("no features to show: pass at least one feature index")
    parameter = next(dictionary.parameters())
    chosen = torch.tensor(features, device=parameter.device)
    generator = torch.Generator().manual_seed(config.seed)
    window = BEFORE + AFTER + 1
    token_filter = TokenFilter(remove_bos=config.remove_bos)
    fired = torch.zeros(len(features), dtype=torch.long)
    max_value = torch.full((len(features),), -torch.inf)
    top, sample, values = _empty(window, True), _empty(window, True), _empty(window, False)
    n_tokens = n_texts = 0
    desc = f"dashboard: reading activations of {len(features)} features"
    bar = progress_bar(desc=desc, total=config.tokens, enabled=config.progress, unit="tok")
    for batch in _batches(texts, config.batch_texts, config.max_texts):
        encoding = tokenize(model.tokenizer, batch, config.ctx_len)
        [rows] = collect(model, encoding, [point], token_filter)  # [n_kept, d]
        if rows.shape[-1] != dictionary.d_in:
            raise ValueError(f"{point} has width {rows.shape[-1]}, but the dictionary reads width "
                             f"{dictionary.d_in}: pass the layer and site it was trained "
                             "on (--layer, --site)")
        real = token_filter.mask(encoding)  # [batch, seq]
        codes = torch.zeros(*real.shape, len(features))  # [batch, seq, n]: 0 where not kept
        if rows.shape[0]:
            kept = dictionary.encode(rows.to(device=parameter.device, dtype=parameter.dtype))
            codes[real] = kept[:, chosen].float().cpu()
        fired += (codes != 0).sum(dim=(0, 1))
        max_value = torch.maximum(max_value,
                                  codes.masked_fill(~real[..., None], -torch.inf).amax(dim=(0, 1)))
        row, position, feature = (codes != 0).nonzero(as_tuple=True)
        value = codes[row, position, feature]
        key = torch.rand(len(value), generator=generator)
        new = {"feature": feature, "key": key, "value": value}
        values = keep_smallest(_concat(values, new), config.reservoir)
        with_place = {**new, "position": position, "row": row}
        for name, keep, table_key in (("top", config.top_examples, -value),
                                      ("sample", config.sample_examples, key)):
            # this batch's best, then windows
            candidates = keep_smallest({**with_place, "key": table_key}, keep)
            candidates = _windows({k: v for k, v in candidates.items() if k != "row"}, codes,
                                  encoding["input_ids"], encoding["attention_mask"].bool(),
                                  candidates["row"], n_texts)
            if name == "top":
                top = keep_smallest(_concat(top, candidates), keep)
            else:
                sample = keep_smallest(_concat(sample, candidates), keep)
        read = int(real.sum())
        n_tokens, n_texts = n_tokens + read, n_texts + len(batch)
        bar.update(min(read, max(config.tokens - bar.n, 0)))
        if n_tokens >= config.tokens:
            break
    bar.close()
    if n_tokens == 0:
        raise ValueError("the texts gave no tokens to read (an empty text source?)")
    max_value = torch.where(fired > 0, max_value, torch.zeros_like(max_value))
    return FeatureStatistics(list(features), n_tokens, n_texts, fired, max_value, top, sample,
                             values)

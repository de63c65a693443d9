"""Connection selection: per feature, the C source features with the largest |mean contribution|
over a dataset. `contribution_statistics` keeps only per-source-feature sums from one pass of the
suite; `pair_contributions` turns them into one module pair's `[d_sae, n_source_module]` mean
contributions at a time, and `connections_from_statistics` keeps a running top-C across source
modules; `select_connections` does both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..checks import renamed_keywords
from ..checks import texts as check_texts
from ..models import attention_ov, norm_params
from ..progress import progress_bar
from .pruned import virtual_weights
from .suite import (
    Connections,
    SCAESuite,
    check_C,
    parameter_fingerprint,
    parse_module_name,
    sources_of,
)
from .tracing import run_suite


@dataclass
class ContributionStatistics:
    """What mean contributions need, summed over `tokens` real tokens: per downstream module and
    source module, sum_t s(t) a_j(t) for transcoders (`[n_source_module]`) and, for attention
    SAEs, sum_q sum_k P_h[q, k] s(k) a_j(k) per head (`[heads, n_source_module]`)."""

    tokens: int
    sums: dict[str, dict[str, torch.Tensor]]


@torch.no_grad()
def contribution_statistics(suite: SCAESuite, model: Any, texts: Any, batch_size: int = 8,
                            ctx_len: int = 128, progress: bool = True) -> ContributionStatistics:
    """One pass of the suite over `texts` (any iterable of strings), keeping only
    per-source-feature sums: memory is a vector (per head) per module pair, whatever the number of
    texts.
    progress: a bar on stderr when this takes more than a few seconds (`progress.DELAY`)."""
    texts = list(check_texts("texts", texts))
    if not texts:
        raise ValueError("contribution statistics need at least one text, got none")
    sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in suite.names}
    tokens = 0
    desc = f"contribution statistics on {len(texts)} texts"
    starts = range(0, len(texts), batch_size)
    for start in progress_bar(starts, desc=desc, enabled=progress, unit="batch"):
        record, _ = run_suite(suite, model, texts[start : start + batch_size], ctx_len=ctx_len,
                              logits=False)
        mask = record.mask.to(torch.float32)
        tokens += int(mask.sum())
        for name in suite.names:
            kind, layer = parse_module_name(name)
            if kind == "mlp":
                weight = record.norm_scales[name] * mask  # [batch, seq]
            else:  # how much each key position is read, summed over real queries, per head
                weight = torch.einsum("bhqk,bq,bk->bhk", record.patterns[layer], mask,
                                      record.norm_scales[name])
            for source in sources_of(name, model):
                pattern = "bt,btj->j" if kind == "mlp" else "bhk,bkj->hj"
                sums[name][source] = sums[name].get(source, 0) + torch.einsum(
                    pattern, weight, record.codes[source])
    return ContributionStatistics(tokens, sums)


@torch.no_grad()
@renamed_keywords(up="source")
def pair_contributions(suite: SCAESuite, model: Any, statistics: ContributionStatistics, name: str,
                       source: str
                       ) -> torch.Tensor:
    """Mean contribution of each feature of module `source` to each feature of `name`'s
    pre-activation, over the tokens of `statistics`: `[d_sae, source's d_sae]`. One module
    pair at a time, so selection never holds more."""
    kind, layer = parse_module_name(name)
    if source not in sources_of(name, model):
        raise ValueError(f"{source} is not a source of {name}; its source modules are "
                         f"{sources_of(name, model)}")
    mean = statistics.sums[name][source] / max(statistics.tokens, 1)
    # [n_source, d_model]
    normed = norm_params(model, layer, kind).linear_part(suite[source].decoder.weight.t())
    encoder = suite[name].encoder.weight
    if kind == "mlp":  # the mean scales the source rows before the GEMM: no pass over its result
        return encoder @ (normed * mean[:, None]).t()
    ov = attention_ov(model, layer)
    # [heads, n_source, d_head]
    values = torch.einsum("jd,hde->hje", normed, ov.W_V) * mean[..., None]
    return encoder @ torch.einsum("hje,hem->jm", values, ov.W_O).t()


@torch.no_grad()
def connections_from_statistics(suite: SCAESuite, model: Any, statistics: ContributionStatistics,
                                C: int, progress: bool = True) -> Connections:
    """The top-C connections per feature by |mean contribution|, strongest first, with a running
    top-C across source modules (one `[d_sae, n_source_module]` matrix at a time).
    progress: a bar over the modules on stderr when this takes more than a few seconds."""
    check_C(C)
    indices, weights, scores, totals = {}, {}, {}, {}
    desc = f"selecting the top {C} connections per feature"
    for name in progress_bar(suite.names, desc=desc, enabled=progress, unit="module"):
        n_features = suite[name].d_sae
        # where the statistics' products are computed
        device = next(suite[name].parameters()).device
        best_values = torch.empty(n_features, 0, device=device)
        best_indices = torch.empty(n_features, 0, dtype=torch.long, device=device)
        totals[name] = torch.zeros(n_features, device=device)
        offset = 0
        for source in sources_of(name, model):
            strength = pair_contributions(suite, model, statistics, name, source).to(device)
            strength.abs_()
            totals[name] += strength.sum(dim=1)
            values, local = strength.topk(min(C, strength.shape[1]), dim=1)
            merged_values = torch.cat([best_values, values], dim=1)
            merged_indices = torch.cat([best_indices, local + offset], dim=1)
            # sorted: strongest first
            best_values, keep = merged_values.topk(min(C, merged_values.shape[1]), dim=1)
            best_indices = merged_indices.gather(1, keep)
            offset += suite[source].d_sae
        indices[name], scores[name] = best_indices, best_values
        weights[name] = virtual_weights(suite, model, name, best_indices)
    return Connections(indices, weights, scores, totals, fingerprint=parameter_fingerprint(suite))


@torch.no_grad()
def select_connections(suite: SCAESuite, model: Any, texts: Any, C: int, batch_size: int = 8,
                       ctx_len: int = 128, progress: bool = True) -> Connections:
    """For every feature, the C source features (across all source modules) with the
    largest |mean contribution| over `texts`, stored as `[d_sae, C]` indices, strongest first
    (fewer where fewer exist), and their virtual weights. The embedding and bias terms are always
    kept, densely.
    progress: bars on stderr over the phases that take more than a few seconds (progress.DELAY)."""
    check_C(C)
    statistics = contribution_statistics(suite, model, texts, batch_size=batch_size,
                                         ctx_len=ctx_len, progress=progress)
    return connections_from_statistics(suite, model, statistics, C, progress=progress)



@torch.no_grad()
def all_connections(suite: SCAESuite, model: Any) -> Connections:
    """Every feature connected to every source feature (C = all): the pruned pass then equals the
    dense one. Only for small suites: this is the dense d_sae x n_sources matrix the pruned
    pass otherwise avoids."""
    suite.check_model(model)
    indices, weights = {}, {}
    for name in suite.names:
        n_sources = suite.n_sources(name, model)
        device = next(suite[name].parameters()).device
        indices[name] = (torch.arange(n_sources, device=device)
                         .expand(suite[name].d_sae, n_sources).contiguous())
        weights[name] = virtual_weights(suite, model, name, indices[name])
    return Connections(indices, weights, fingerprint=parameter_fingerprint(suite))


@torch.no_grad()
def random_connections(suite: SCAESuite, C: int, seed: int = 0, model: Any = None) -> Connections:
    """The control for selected connections: for every feature, C distinct source features drawn
    uniformly at random (all of them where fewer exist), with their virtual weights. Marked
    `random`, so `ce_versus_c` takes its first C per row as a random C-subset too."""
    check_C(C)
    if model is not None:
        suite.check_model(model)
    generator = torch.Generator().manual_seed(seed)
    indices, weights = {}, {}
    for name in suite.names:
        n_sources, rows = suite.n_sources(name, model), suite[name].d_sae
        count = min(C, n_sources)
        if count == 0:  # no source (the first module)
            drawn = torch.zeros(rows, 0, dtype=torch.long)
        elif count * 2 > n_sources:  # dense draw: a random permutation per row
            drawn = torch.rand(rows, n_sources, generator=generator).argsort(dim=1)[:, :count]
        # sparse draw: redraw only the repeated entries (each collides with probability < 1/2),
        # shuffle
        else:
            drawn = torch.randint(n_sources, (rows, count), generator=generator)
            while True:
                ordered, order = drawn.sort(dim=1)
                repeat = torch.zeros_like(drawn, dtype=torch.bool)
                repeat.scatter_(1, order[:, 1:], ordered[:, 1:] == ordered[:, :-1])
                if not repeat.any():
                    break
                drawn[repeat] = torch.randint(n_sources, (int(repeat.sum()),),
                                              generator=generator)
            drawn = drawn.gather(1, torch.rand(rows, count, generator=generator).argsort(dim=1))
        device = next(suite[name].parameters()).device
        indices[name] = drawn.to(device)
        weights[name] = virtual_weights(suite, model, name, indices[name])
    return Connections(indices, weights, random=True, fingerprint=parameter_fingerprint(suite))

"""Edge effects between the nodes of two sites (Marks et al. 2024): how much of a downstream node's
effect passes through each upstream node,

    edge(u -> d) = (u_patch - u_clean) * d (g_d * d) / d u,

at the clean run, g_d the metric's gradient at d from the node method (attribution patching's, or
integrated gradients' averaged along the path), the derivative taken along the paths from u to d
that pass no site in between (those are frozen: their values are kept and pass no gradient). An
error node's value is its vector, so for it g_d * d is the dot product.

Only the downstream nodes whose |node effect| exceeds `node_threshold` (per example and position)
get edges: one row each, holding every upstream node at every position, from batched backward
passes in chunks (`torch.autograd.grad(is_grads_batched=True)`); no [features x features] matrix
is formed. `edge_pairs` lists the pairs the paper uses: a residual (or embedding) site feeds every
site up to and including the next residual site, any other site the later sites up to and
including that residual site.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .. import tracing
from .nodes import NodeState, node_state
from .sites import Site, SiteValues, splice


@dataclasses.dataclass
class EdgeEffects:
    """Edges into the chosen nodes of `downstream` from every node of `upstream`: `rows` `[n, 3]`
    (example, position, node: node index d_sae is the error node), `values` `[n, seq,
    upstream d_sae + 1]` (upstream position, node; the last is the error node)."""

    upstream: str
    downstream: str
    rows: torch.Tensor
    values: torch.Tensor
    downstream_nodes: int
    batch: int

    def summed(self) -> torch.Tensor:
        """`[downstream d_sae + 1, upstream d_sae + 1]` (sparse): summed over both positions,
        averaged over examples, as the paper aggregates."""
        totals = self.values.sum(1) / self.batch  # [n, upstream nodes]
        nodes = totals.shape[1]
        columns = torch.arange(nodes).repeat(len(self.rows))
        indices = torch.stack([self.rows[:, 2].repeat_interleave(nodes), columns])
        return torch.sparse_coo_tensor(indices, totals.flatten(), (self.downstream_nodes, nodes),
                                       check_invariants=True).coalesce()


def edge_pairs(sites: list[Site]) -> list[tuple[str, str, list[str]]]:
    """(upstream, downstream, frozen sites between them) for sites in execution order: a site
    whose hook point is named `...resid` or `...embed` bounds a layer."""
    def bound(site: Site) -> bool:
        return str(site.point).endswith(("resid", "embed"))

    pairs = []
    for i, upstream in enumerate(sites):
        for j in range(i + 1, len(sites)):
            pairs.append((upstream.name, sites[j].name, [s.name for s in sites[i + 1:j]]))
            if bound(sites[j]):
                break
    return pairs


def edge_effects(model: Any, sites: Any = None, clean: Any = None, patch: Any = None,
                 metric: Any = None, *, method: str = "attribution", steps: int = 10,
                 ig_rule: str = "midpoint", node_threshold: float = 0.0,
                 pairs: list[tuple[str, str, list[str]]] | None = None, chunk: int = 64,
                 state: NodeState | None = None, clean_answers: Any = None,
                 patch_answers: Any = None) -> dict[tuple[str, str], EdgeEffects]:
    """Edge effects for every pair of `edge_pairs(sites)` (sites sorted in execution order) or the
    `pairs` given; arguments as `node_effects`, whose state (`node_state`) may be passed in."""
    if state is None:
        state = node_state(model, sites, clean, patch, metric, method=method, steps=steps,
                           ig_rule=ig_rule, clean_answers=clean_answers,
                           patch_answers=patch_answers)
    ordered = sorted(state.sites, key=lambda site: tracing.execution_key(model, site.point))
    by_name = {site.name: site for site in ordered}
    results = {}
    for upstream, downstream, frozen in pairs if pairs is not None else edge_pairs(ordered):
        results[(upstream, downstream)] = _edges(model, state, by_name[upstream],
                                                 by_name[downstream],
                                                 [by_name[name] for name in frozen],
                                                 node_threshold, chunk)
    return results


def _chosen(state: NodeState, site: Site, threshold: float) -> torch.Tensor:
    effects = state.effects
    table = torch.cat([effects.features[site.name], effects.errors[site.name][..., None]], -1)
    return (table.abs() > threshold).nonzero()  # [n, 3]: example, position, node


def _edges(model: Any, state: NodeState, upstream: Site, downstream: Site, frozen: list[Site],
           threshold: float, chunk: int) -> EdgeEffects:
    rows = _chosen(state, downstream, threshold)
    batch, seq = state.clean_encoding["input_ids"].shape
    up_nodes = upstream.d_sae + 1
    values = torch.zeros(len(rows), seq, up_nodes, dtype=state.clean[upstream.name].error.dtype)
    if len(rows):
        store: dict[str, SiteValues] = {}
        modes = {upstream.name: "attribute", downstream.name: "through",
                 **{site.name: "frozen" for site in frozen}}
        # in the replacement model every other site writes its reconstruction too
        spliced = (state.sites if state.errors == "zero"
                   else [upstream, *frozen, downstream])
        with torch.enable_grad():
            tracing.run(model, state.clean_encoding, logits=False, grad=True,
                        patch=splice(spliced, modes, store, errors=state.errors))
            values = _backward(store, state, upstream, downstream, rows, seq, chunk)
    return EdgeEffects(upstream.name, downstream.name, rows, values, downstream.d_sae + 1, batch)


def _backward(store: dict[str, SiteValues], state: NodeState, upstream: Site, downstream: Site,
              rows: torch.Tensor, seq: int, chunk: int) -> torch.Tensor:
    down, up = store[downstream.name], store[upstream.name]
    gradient = state.gradients[downstream.name]
    example, position, node = rows.unbind(1)
    is_error = node == downstream.d_sae
    # each chosen node's g_d * d: a feature's product, or the error's dot product
    weighted = torch.zeros(len(rows), dtype=down.features.dtype)
    features = ~is_error
    weighted[features] = (gradient.features[example[features], position[features],
                                            node[features]]
                          * down.features[example[features], position[features],
                                          node[features]])
    weighted[is_error] = (gradient.error[example[is_error], position[is_error]]
                          * down.error[example[is_error], position[is_error]]).sum(-1)
    feature_delta = state.patch[upstream.name].features - state.clean[upstream.name].features
    error_delta = state.patch[upstream.name].error - state.clean[upstream.name].error
    parts = []
    for start in range(0, len(rows), chunk):
        size = min(chunk, len(rows) - start)
        selector = torch.zeros(size, len(rows), dtype=weighted.dtype)
        selector[torch.arange(size), torch.arange(start, start + size)] = 1
        grads = torch.autograd.grad(weighted, [up.features, up.error], grad_outputs=selector,
                                    is_grads_batched=True, retain_graph=True, allow_unused=True)
        grads = [torch.zeros(size, *leaf.shape, dtype=leaf.dtype) if g is None else g
                 for leaf, g in zip((up.features, up.error), grads)]
        rows_examples = example[start:start + size]
        index = torch.arange(size)
        feature_part = grads[0][index, rows_examples] * feature_delta[rows_examples]
        error_part = (grads[1][index, rows_examples] * error_delta[rows_examples]).sum(-1)
        parts.append(torch.cat([feature_part, error_part[..., None]], -1))
    return torch.cat(parts)

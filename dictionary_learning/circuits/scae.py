"""Circuits over an SCAE suite: its attention SAEs and transcoders as sites, found in the suite's
replacement model (every attention output and MLP output replaced by its module's reconstruction:
`errors="zero"`, the run the suite's linearisation is taken at), and the edges its pruned pass
defines exactly beside the attribution edges, with their agreement.

In the pruned pass (`scae/__init__.py`), feature F of module d at position q reads

    pre_F(q) = sum_{u, j connected to F} sum_k s_d(k) W_Fj(q, k) f_uj(k) + embedding + bias,

s_d the scale of the norm before d (at token k), W_Fj the virtual weight: for a transcoder
w_Fj at k = q only, for an attention SAE sum_h P_h(q, k) w_Fjh under the recorded patterns. So the
exact edge from source feature j of module u at position k, in the units of `edges.py`, is

    exact(u_j(k) -> F(q)) = g_F(q) [f_F(q) > 0] s_d(k) W_Fj(q, k) (f_uj^patch(k) - f_uj^clean(k)),

g_F the metric's gradient at F. The attribution edge (`edge_effects` on the same state) takes that
derivative through the model itself: every source feature (not only the C connected ones), the
norm's scale and the attention pattern moving with it. `edge_agreement` says how much of the
attribution edges' mass the connections carry and how far the two differ.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ..scae.suite import SCAESuite, sources_of
from ..scae.tracing import layer_points, run_suite
from .edges import EdgeEffects, _chosen, edge_effects
from .nodes import NodeState, node_state
from .sites import Site

Pair = tuple[str, str, list[str]]


def suite_sites(suite: SCAESuite, model: Any) -> list[Site]:
    """The suite's modules as sites in execution order: each attention SAE at its attention output,
    each transcoder from its MLP's input to its output (a suite of another model's shape, or
    trained on another model, is refused)."""
    suite.check_model(model)
    sites = []
    for layer in range(suite.n_layers):
        points = layer_points(model, layer)
        sites.append(Site(f"attn_{layer}", suite[f"attn_{layer}"], points.attn_out))
        sites.append(Site(f"mlp_{layer}", suite[f"mlp_{layer}"], points.mlp_out, points.mlp_in))
    return sites


def suite_pairs(suite: SCAESuite, model: Any) -> list[Pair]:
    """(source, module, the modules between them) for every module and each module it reads
    (`sources_of`): the suite's edges go from any earlier module, not only the next."""
    names = list(suite.names)
    return [(source, name, names[names.index(source) + 1:names.index(name)])
            for name in names for source in sources_of(name, model)]


def suite_node_state(suite: SCAESuite, model: Any, clean: Any, patch: Any = None,
                     metric: Any = None, **options: Any) -> NodeState:
    """`node_state` over the suite's sites in its replacement model (options as `node_state`'s)."""
    return node_state(model, suite_sites(suite, model), clean, patch, metric, errors="zero",
                      **options)


@torch.no_grad()
def connection_edges(suite: SCAESuite, model: Any, state: NodeState, node_threshold: float = 0.0,
                     pairs: list[Pair] | None = None) -> dict[tuple[str, str], EdgeEffects]:
    """The exact edges (module docstring) of the suite's connections (`suite.connections`) into
    the nodes of each module whose |node effect| exceeds `node_threshold`, laid out as
    `edge_effects`' (the upstream error node's column is zero: the replacement model has no
    error). The model must run eager attention (the patterns are recorded)."""
    if state.errors != "zero":
        raise ValueError("connection edges are taken in the suite's replacement model: build the "
                         "state with suite_node_state (errors='zero')")
    connections = suite.connections
    if connections is None:
        raise ValueError("the suite has no connections: select them first "
                         "(scae.select_connections) or attach them (suite.connections = ...)")
    connections.validate(suite, model)
    record, _ = run_suite(suite, model, state.clean_encoding, logits=False)
    by_name = {site.name: site for site in state.sites}
    results = {}
    for upstream, downstream, _ in pairs if pairs is not None else suite_pairs(suite, model):
        if downstream not in suite.names or upstream not in sources_of(downstream, model):
            raise ValueError(f"({upstream!r}, {downstream!r}) is not a pair of the suite: a "
                             f"module's sources are the modules before it (suite_pairs)")
        rows = _chosen(state, by_name[downstream], node_threshold)
        results[(upstream, downstream)] = EdgeEffects(
            upstream, downstream, rows,
            _exact(suite, model, state, record, upstream, downstream, rows),
            suite[downstream].d_sae + 1, state.clean_encoding["input_ids"].shape[0])
    return results


def _exact(suite: SCAESuite, model: Any, state: NodeState, record: Any, upstream: str,
           downstream: str, rows: torch.Tensor) -> torch.Tensor:
    """`[len(rows), seq, upstream d_sae + 1]`: each chosen node's exact edges from `upstream`
    (none into an error node)."""
    seq = state.clean_encoding["input_ids"].shape[1]
    d_up, d_down = suite[upstream].d_sae, suite[downstream].d_sae
    delta = state.patch[upstream].features - state.clean[upstream].features  # [batch, seq, d_up]
    values = torch.zeros(len(rows), seq, d_up + 1, dtype=delta.dtype)
    if not len(rows):
        return values
    example, position, node = rows.unbind(1)
    is_feature = node < d_down
    node = node.clamp(max=d_down - 1)
    local, connected = _connected(suite, model, upstream, downstream, node)
    weights = suite.connections.weights[downstream][node].to(delta)  # [n, C] / [n, C, heads]
    clean = state.clean[downstream].features[example, position, node]
    coefficient = (state.gradients[downstream].features[example, position, node]
                   * (clean > 0) * is_feature)
    scale = record.norm_scales[downstream].to(delta)[example]  # [n, seq]: s_d at each key
    if weights.dim() == 2:  # a transcoder: its own position only, W = w
        mixing = F.one_hot(position, seq).to(delta)[:, :, None] * weights[:, None]
    else:  # an attention SAE: W(q, k) = sum_h P_h(q, k) w_h
        layer = int(downstream.split("_")[1])
        pattern = record.patterns[layer].to(delta)[example, :, position]  # [n, heads, seq]
        mixing = torch.einsum("nhk,nch->nkc", pattern, weights)
    where = local[:, None, :].expand(-1, seq, -1)  # [n, seq, C]
    moved = delta[example].gather(2, where)  # [n, seq, C]
    terms = coefficient[:, None, None] * scale[:, :, None] * mixing * moved * connected[:, None]
    return values.scatter_add_(2, where, terms)


def _connected(suite: SCAESuite, model: Any, upstream: str, downstream: str, node: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """For downstream features `node` `[n]`: their C connections as `upstream`'s feature indices
    (clamped into range) and whether each is one of `upstream`'s, both `[n, C]`."""
    sources = sources_of(downstream, model)
    offset = sum(suite[source].d_sae for source in sources[:sources.index(upstream)])
    indices = suite.connections.indices[downstream][node] - offset
    d_up = suite[upstream].d_sae
    return indices.clamp(0, d_up - 1), (indices >= 0) & (indices < d_up)


@dataclasses.dataclass
class EdgeAgreement:
    """How the exact connection edges into one module's chosen nodes from one source module
    compare with the attribution edges (feature edges; both `[nodes, positions, features]`):
    `captured` the share of the attribution edges' summed |effect| on connected pairs, `error` and
    `error_on_connections` ||attribution - exact|| / ||attribution|| over all pairs and over the
    connected ones, `correlation` Pearson's over the connected ones."""

    upstream: str
    downstream: str
    nodes: int
    captured: float
    error: float
    error_on_connections: float
    correlation: float


def edge_agreement(suite: SCAESuite, model: Any,
                   exact: dict[tuple[str, str], EdgeEffects],
                   attributed: dict[tuple[str, str], EdgeEffects]
                   ) -> dict[tuple[str, str], EdgeAgreement]:
    """Per (source, module) pair in both, their `EdgeAgreement` (NaN where a ratio is 0 / 0)."""
    results = {}
    for pair in exact.keys() & attributed.keys():
        mine, theirs = exact[pair], attributed[pair]
        if not torch.equal(mine.rows, theirs.rows):
            raise ValueError(f"{pair}: the exact and attribution edges are into different nodes "
                             "(build both from one state and one node_threshold)")
        upstream, downstream = pair
        d_up = suite[upstream].d_sae
        node = mine.rows[:, 2].clamp(max=suite[downstream].d_sae - 1)
        local, connected = _connected(suite, model, upstream, downstream, node)
        # (a sum, not a write: the clamped indices of other modules' features land anywhere)
        mask = torch.zeros(len(node), d_up).scatter_add_(1, local, connected.float()) > 0
        mask &= (mine.rows[:, 2] < suite[downstream].d_sae)[:, None]
        a, e = theirs.values[..., :d_up], mine.values[..., :d_up].to(theirs.values)
        on = mask[:, None].expand_as(a)
        pair_values = torch.stack([a[on], e[on]]) if bool(on.any()) else torch.zeros(2, 0)
        results[pair] = EdgeAgreement(
            upstream, downstream, len(mine.rows), _ratio(a[on].abs().sum(), a.abs().sum()),
            _ratio((a - e).norm(), a.norm()), _ratio((a - e)[on].norm(), a[on].norm()),
            float(torch.corrcoef(pair_values)[0, 1]) if pair_values.shape[1] > 1
            else float("nan"))
    return results


def _ratio(top: torch.Tensor, bottom: torch.Tensor) -> float:
    return float(top / bottom) if float(bottom) else float("nan")


def suite_edges(suite: SCAESuite, model: Any, state: NodeState, node_threshold: float = 0.0,
                chunk: int = 64) -> tuple[dict, dict, dict[tuple[str, str], EdgeAgreement]]:
    """(exact connection edges, attribution edges, their agreement) for every (source, module)
    pair of the suite, into the nodes whose |node effect| exceeds `node_threshold`."""
    pairs = suite_pairs(suite, model)
    exact = connection_edges(suite, model, state, node_threshold, pairs)
    attributed = edge_effects(model, state=state, node_threshold=node_threshold, pairs=pairs,
                              chunk=chunk)
    return exact, attributed, edge_agreement(suite, model, exact, attributed)

"""A circuit as a graph a researcher can read: its nodes (features and error nodes whose effect,
summed over positions and averaged over examples, exceeds the node threshold) in layers, one layer
per site in execution order, and the edges between them whose |effect| exceeds the edge threshold;
drawn with matplotlib (PNG, SVG, PDF by the file's suffix), and written in circuit-tracer's graph
JSON (the schema of its `frontend.graph_models.Model`) so its viewer opens it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..evaluation.contexts import top_activating_contexts
from ..files import atomic_write_text, pyplot, save_figure
from .edges import EdgeEffects
from .faithfulness import circuit_nodes
from .nodes import NodeState
from .sites import Site


@dataclasses.dataclass
class CircuitGraph:
    """nodes: dicts with id, site, row (the site's index), feature (-1: the error node),
    position (where its effect is largest), effect, label; links: dicts with source, target,
    weight; metric: the metric's clean and patched means and their difference."""

    nodes: list[dict[str, Any]]
    links: list[dict[str, Any]]
    sites: list[str]
    metric: dict[str, float]
    node_threshold: float
    edge_threshold: float


def build_graph(state: NodeState, edges: Mapping[tuple[str, str], EdgeEffects],
                node_threshold: float, edge_threshold: float = 0.0,
                labels: Mapping[tuple[str, int], str] | None = None,
                dashboards: Mapping[str, str] | None = None) -> CircuitGraph:
    """The circuit's graph: the nodes `circuit_nodes(state, node_threshold)` keeps, the edges
    between kept nodes with |summed effect| > edge_threshold. labels: `{(site, feature): text}`
    (e.g. `feature_labels`: a feature's top activating tokens). dashboards: `{site: the address
    of its dictionary's dashboard page}`; each feature node links to its page there
    (`...index.html#feature-N`, the link an SVG drawing carries)."""
    sites = [site.name for site in state.sites]
    kept = circuit_nodes(state, node_threshold)
    per_position = state.effects.mean()
    summed = state.effects.summed().mean()
    nodes, ids = [], {}
    for row, site in enumerate(state.sites):
        errors = per_position.errors[site.name]
        for index in kept[site.name].nonzero().flatten().tolist():
            error = index == site.d_sae
            effect = summed.errors[site.name] if error else summed.features[site.name][index]
            positions = errors if error else per_position.features[site.name][:, index]
            node_id = f"{site.name}/{'error' if error else index}"
            label = f"{site.name} error" if error else (labels or {}).get((site.name, index),
                                                                          f"{site.name} #{index}")
            ids[(site.name, index)] = node_id
            page = (dashboards or {}).get(site.name)
            nodes.append({"id": node_id, "site": site.name, "row": row,
                          "feature": -1 if error else index,
                          "position": int(positions.abs().argmax()), "effect": float(effect),
                          "label": label,
                          "url": f"{page}#feature-{index}" if page and not error else None})
    links = []
    for (upstream, downstream), found in edges.items():
        matrix = found.summed()
        for (d, u), weight in zip(matrix.indices().t().tolist(), matrix.values().tolist()):
            source, target = ids.get((upstream, u)), ids.get((downstream, d))
            if source and target and abs(weight) > edge_threshold:
                links.append({"source": source, "target": target, "weight": float(weight)})
    effects = state.effects
    metric = {"clean": float(effects.clean.mean()), "patched": float(effects.patched.mean()),
              "total": float(effects.total.mean())}
    return CircuitGraph(nodes, links, sites, metric, float(node_threshold), float(edge_threshold))


def draw_graph(graph: CircuitGraph, path: str | Path, title: str | None = None) -> Path:
    """The graph drawn in layers (sites bottom to top), features as circles and error nodes as
    squares, blue for effects that raise the metric and red for those that lower it, edge width
    by |effect|; the format from the suffix (.png, .svg, .pdf). In an SVG a feature node with a
    dashboard page links to it. Labels alternate above and below the nodes of a layer, so
    neighbours' labels do not overlap."""
    plt = pyplot()
    path = Path(path)
    rows: dict[int, list[dict]] = {}
    for node in graph.nodes:
        rows.setdefault(node["row"], []).append(node)
    where, below = {}, set()
    for row, members in rows.items():
        members.sort(key=lambda n: (n["feature"] == -1, -abs(n["effect"])))
        for i, node in enumerate(members):
            where[node["id"]] = ((i + 1) / (len(members) + 1), row)
            if i % 2:
                below.add(node["id"])
    width = max([len(m) for m in rows.values()] + [4])
    figure, axes = plt.subplots(figsize=(min(2 + 1.6 * width, 40), 1.5 + 1.3 * len(graph.sites)))
    largest = max([abs(link["weight"]) for link in graph.links] + [1e-12])
    for link in graph.links:
        (x0, y0), (x1, y1) = where[link["source"]], where[link["target"]]
        axes.plot([x0, x1], [y0, y1], color="tab:blue" if link["weight"] > 0 else "tab:red",
                  linewidth=0.3 + 4 * abs(link["weight"]) / largest, alpha=0.6, zorder=1)
    for node in graph.nodes:
        x, y = where[node["id"]]
        axes.scatter([x], [y], s=260, marker="s" if node["feature"] == -1 else "o",
                     color="tab:blue" if node["effect"] > 0 else "tab:red", edgecolor="black",
                     zorder=2, urls=[node.get("url")])
        under = node["id"] in below
        axes.annotate(node["label"], (x, y), textcoords="offset points",
                      xytext=(0, -11 if under else 11), ha="center",
                      va="top" if under else "bottom", fontsize=7, zorder=3)
    axes.set_yticks(range(len(graph.sites)), graph.sites)
    axes.set_ylim(-0.7, len(graph.sites) - 0.3)
    axes.set_xlim(0, 1)
    axes.set_xticks([])
    axes.set_title(title or f"circuit: {len(graph.nodes)} nodes (|effect| > "
                   f"{graph.node_threshold:g}), {len(graph.links)} edges; metric "
                   f"{graph.metric['clean']:.3f} -> {graph.metric['patched']:.3f}", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, dpi=150)
    return path


def draw_curve(curve: list[Any], path: str | Path) -> Path:
    """Faithfulness (the circuit alone) and completeness (its complement) against the circuit's
    size, from `faithfulness_curve`."""
    path = Path(path)
    figure, axes = pyplot().subplots(figsize=(5, 3.5))
    sizes = [max(point.nodes + point.error_nodes, 1) for point in curve]
    axes.plot(sizes, [p.faithfulness for p in curve], "o-", label="faithfulness (circuit)")
    axes.plot(sizes, [p.completeness for p in curve], "s-", label="completeness (complement)")
    axes.set_xscale("log")
    axes.set_xlabel("nodes in the circuit")
    axes.axhline(1, color="grey", linewidth=0.5)
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    return path


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def circuit_tracer_graph(graph: CircuitGraph, prompt_tokens: list[str], slug: str,
                         scan: str = "dictionary_learning") -> dict[str, Any]:
    """The graph in circuit-tracer's graph JSON: one layer per site, features as its "cross
    layer transcoder" nodes (feature = Cantor pairing of layer and index, as its own), error
    nodes as its reconstruction-error nodes, and one logit node for the metric, which the last
    site's nodes link to with their effects."""
    nodes, ids = [], {}
    for node in graph.nodes:
        layer, position = node["row"], node["position"]
        error = node["feature"] == -1
        node_id = (f"0_{layer}_{position}" if error
                   else f"{layer}_{node['feature']}_{position}")
        ids[node["id"]] = node_id
        nodes.append({"node_id": node_id, "jsNodeId": node_id,
                      "feature": -1 if error else _cantor(layer, node["feature"]),
                      "layer": str(layer), "ctx_idx": position,
                      "feature_type": ("mlp reconstruction error" if error
                                       else "cross layer transcoder"),
                      "clerp": node["label"], "influence": abs(node["effect"]),
                      "activation": None, "token_prob": 0.0, "is_target_logit": False,
                      "run_idx": 0, "reverse_ctx_idx": 0})
    last = len(prompt_tokens) - 1
    logit_id = f"{len(graph.sites) + 1}_0_{last}"
    nodes.append({"node_id": logit_id, "jsNodeId": logit_id, "feature": 0,
                  "layer": str(len(graph.sites) + 1), "ctx_idx": last, "feature_type": "logit",
                  "clerp": f"metric {graph.metric['clean']:.3f} -> {graph.metric['patched']:.3f}",
                  "influence": None, "activation": None, "token_prob": 0.0,
                  "is_target_logit": True, "run_idx": 0, "reverse_ctx_idx": 0})
    links = [{"source": ids[link["source"]], "target": ids[link["target"]],
              "weight": link["weight"]} for link in graph.links]
    last_row = max((node["row"] for node in graph.nodes), default=None)
    links += [{"source": ids[node["id"]], "target": logit_id, "weight": node["effect"]}
              for node in graph.nodes if node["row"] == last_row]
    return {"metadata": {"slug": slug, "scan": scan, "transcoder_list": [],
                         "prompt_tokens": list(prompt_tokens), "prompt": "".join(prompt_tokens),
                         "node_threshold": graph.node_threshold, "schema_version": 1},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                        "sg_pos": ""},
            "nodes": nodes, "links": links}


def write_circuit_tracer_graph(graph: CircuitGraph, path: str | Path, prompt_tokens: list[str],
                               slug: str | None = None) -> Path:
    """`circuit_tracer_graph` written to `path` (a .json file; its stem is the slug by default)."""
    path = Path(path)
    document = circuit_tracer_graph(graph, prompt_tokens, slug or path.stem)
    atomic_write_text(path, json.dumps(document, indent=1))
    return path



def feature_labels(model: Any, sites: list[Site], features: Mapping[str, list[int]],
                   texts: list[str], n_top: int = 3, tokens: int = 16_384,
                   ctx_len: int = 128) -> dict[tuple[str, int], str]:
    """`{(site, feature): "site #feature: «tok» «tok» «tok»"}`: each feature's top activating
    tokens on `texts` (the first `tokens` of them), as the dashboard finds them, for the graph's
    labels. features: `{site name: [feature, ...]}`."""
    labels = {}
    for site in sites:
        wanted = [int(f) for f in features.get(site.name, [])]
        if not wanted:
            continue
        contexts = top_activating_contexts(site.dictionary, model, site.source or site.point,
                                           texts, wanted, n_top=n_top, ctx_len=ctx_len,
                                           window=0, progress=False, tokens=tokens)
        for feature, rows in contexts.items():
            shown = " ".join(text[text.index("«"):text.index("»") + 1] for _, text in rows)
            labels[(site.name, feature)] = f"{site.name} #{feature}: {shown}".strip()
    return labels

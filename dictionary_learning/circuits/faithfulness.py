"""Circuits and how faithful they are, by real ablations (Marks et al. 2024, section 3): a circuit
keeps the nodes whose effect (summed over positions, averaged over examples) exceeds a threshold;
every other node (feature or error) is mean-ablated, replaced at each position by its mean over
the clean prompts at that position (the paper's, feature-circuits' `x.mean(dim=0)`). Sites run in
order, each encoding what reaches it, so an ablation upstream moves the features downstream as in
the model.

    faithfulness(C) = (m(C) - m(empty)) / (m(model) - m(empty))

m the metric averaged over the clean examples, m(empty) with every node ablated; completeness is
the faithfulness of the complement (everything but C kept): near 0 means C holds all that matters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .nodes import Metric, NodeState, run_metric
from .sites import Site, SiteValues

Kept = Mapping[str, torch.Tensor]  # site name -> [d_sae + 1] bool (the last: the error node)


def circuit_nodes(state: NodeState, threshold: float) -> dict[str, torch.Tensor]:
    """Per site, the nodes `[d_sae + 1]` (the last the error node) whose effect summed over
    positions and averaged over examples exceeds `threshold` in absolute value."""
    effects = state.effects.summed().mean()
    return {site.name: torch.cat([effects.features[site.name],
                                  effects.errors[site.name][None]]).abs() > threshold
            for site in state.sites}


def mean_values(state: NodeState) -> dict[str, SiteValues]:
    """Each site's features `[seq, d_sae]` and error `[seq, d]` at each position averaged over the
    clean examples (the prompts are of one length): the values an ablated node takes."""
    return {name: SiteValues(values.features.mean(0), values.error.mean(0))
            for name, values in state.clean.items()}


def ablated_metric(model: Any, sites: Sequence[Site], encoding: dict[str, torch.Tensor],
                   metric: Metric, kept: Kept, means: Mapping[str, SiteValues],
                   errors: str = "keep") -> torch.Tensor:
    """The metric `[batch]` with, at every site, the nodes not `kept` set to their means (of the
    replacement model with `errors="zero"`)."""
    def ablate(name: str):
        keep = kept[name]

        def replace(features: torch.Tensor, error: torch.Tensor):
            mean = means[name]
            features = torch.where(keep[:-1].to(features.device), features,
                                   mean.features.to(features))
            error = error if bool(keep[-1]) else mean.error.to(error).expand_as(error)
            return features, error
        return replace

    value, _ = run_metric(model, list(sites), encoding, metric,
                          {site.name: ablate(site.name) for site in sites}, errors)
    return value


@dataclasses.dataclass
class Faithfulness:
    """One point of the curve: the threshold, the nodes kept (features and error nodes), the
    metric with the circuit alone and with its complement, and the two ratios."""

    threshold: float
    nodes: int
    error_nodes: int
    metric_circuit: float
    metric_complement: float
    faithfulness: float
    completeness: float


def faithfulness_curve(model: Any, state: NodeState, metric: Metric,
                       thresholds: Sequence[float]) -> list[Faithfulness]:
    """Faithfulness and completeness of the circuit at each threshold, by ablation runs on the
    clean prompts (two per threshold, two for the ends)."""
    sites, encoding, means = state.sites, state.clean_encoding, mean_values(state)
    everything = {site.name: torch.ones(site.d_sae + 1, dtype=torch.bool) for site in sites}
    nothing = {name: ~keep for name, keep in everything.items()}

    def ablated(kept: Kept) -> float:
        return ablated_metric(model, sites, encoding, metric, kept, means,
                              state.errors).mean().item()

    full, empty = ablated(everything), ablated(nothing)
    span = full - empty
    points = []
    for threshold in thresholds:
        kept = circuit_nodes(state, threshold)
        complement = {name: ~keep for name, keep in kept.items()}
        circuit, rest = ablated(kept), ablated(complement)
        points.append(Faithfulness(
            float(threshold), int(sum(int(k[:-1].sum()) for k in kept.values())),
            int(sum(int(k[-1]) for k in kept.values())), circuit, rest,
            (circuit - empty) / span if span else float("nan"),
            (rest - empty) / span if span else float("nan")))
    return points

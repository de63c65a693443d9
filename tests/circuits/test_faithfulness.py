"""Circuits by real ablations: the metric with the nodes outside a circuit mean-ablated equals a
plain PyTorch forward-hook computation of the same ablation at every site in turn; the curve's
ends are exact (all kept: faithfulness 1, completeness 0; none: 0 and 1)."""

import torch

from dictionary_learning import hook
from dictionary_learning.circuits.faithfulness import (
    ablated_metric,
    circuit_nodes,
    faithfulness_curve,
    mean_values,
)
from dictionary_learning.circuits.nodes import node_state
from dictionary_learning.circuits.sites import as_sites
from dictionary_learning.dictionary import AutoEncoder

from .test_nodes import METRIC, plain_value, prompts, randomized


def two_sites(model):
    d = model.config.hidden_size
    return as_sites({"resid_0": (randomized(AutoEncoder(d, 64), 1), hook(model, 0, "resid")),
                     "resid_1": (randomized(AutoEncoder(d, 40), 2), hook(model, 1, "resid"))})


def plain_ablation(model, sites, ids, kept, means):
    """The metric with plain forward hooks: at each site, encode what reaches it, set the nodes
    not kept to their means, write decode + error back."""
    handles = []
    for site in sites:
        module = model._module.get_submodule(site.point.path)

        def swap(module, args, out, site=site):
            x = (out[0] if isinstance(out, tuple) else out).double()
            features = site.dictionary.encode(x)
            error = x - site.dictionary.decode(features)
            keep = kept[site.name]
            features = torch.where(keep[:-1], features, means[site.name].features)
            if not keep[-1]:
                error = means[site.name].error.expand_as(error)
            new = (site.dictionary.decode(features) + error).to(out[0].dtype
                                                                 if isinstance(out, tuple)
                                                                 else out.dtype)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        handles.append(module.register_forward_hook(swap))
    try:
        with torch.no_grad():
            return METRIC(model._module(ids).logits)
    finally:
        for handle in handles:
            handle.remove()


def test_ablations_match_plain_hooks(model64):
    sites = two_sites(model64)
    clean, patch = prompts(seed=7)
    state = node_state(model64, sites, clean, patch, METRIC)
    means = mean_values(state)
    for site in sites:  # the paper's mean ablation: per position, over the examples
        x = plain_value(model64, clean, site.point).double()
        torch.testing.assert_close(means[site.name].features,
                                   site.dictionary.encode(x).mean(0))
        torch.testing.assert_close(means[site.name].error,
                                   (x - site.dictionary(x)).mean(0))
    generator = torch.Generator().manual_seed(0)
    kept = {site.name: torch.rand(site.d_sae + 1, generator=generator) < 0.3 for site in sites}
    kept["resid_1"][-1] = True  # one error node kept, one ablated
    kept["resid_0"][-1] = False
    with torch.no_grad():
        expected = plain_ablation(model64, sites, clean, kept, means)
    got = ablated_metric(model64, sites, state.clean_encoding, METRIC, kept, means)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # and the ablation matters: it is not the clean metric
    assert (got - state.effects.clean).abs().max() > 1e-3


def test_curve_ends_and_monotone_sizes(tiny_llama):
    sites = two_sites(tiny_llama)
    clean, patch = prompts(seed=8)
    state = node_state(tiny_llama, sites, clean, patch, METRIC)
    points = faithfulness_curve(tiny_llama, state, METRIC, [-1.0, 1e-3, 1e-2, float("inf")])
    first, *_, last = points
    assert first.nodes == 104 and first.error_nodes == 2
    assert abs(first.faithfulness - 1) < 1e-4 and abs(first.completeness) < 1e-4
    assert last.nodes == 0 and last.error_nodes == 0
    assert abs(last.faithfulness) < 1e-4 and abs(last.completeness - 1) < 1e-4
    assert [p.nodes for p in points] == sorted((p.nodes for p in points), reverse=True)
    kept = circuit_nodes(state, 1e-2)
    assert sum(int(k.sum()) for k in kept.values()) == points[2].nodes + points[2].error_nodes

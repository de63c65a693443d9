"""Edge effects against real patched runs: an edge row (one downstream node, every upstream node)
is the derivative of g_d * d along the move of the upstream site from clean to patch with the
sites between held at their clean values, which finite differences of real runs measure; a single
edge likewise; and the paper's layout of pairs."""

import pytest
import torch

from dictionary_learning import hook
from dictionary_learning.circuits.edges import edge_effects, edge_pairs
from dictionary_learning.circuits.nodes import as_encoding, node_state, run_metric
from dictionary_learning.circuits.sites import as_sites
from dictionary_learning.dictionary import AutoEncoder, AutoEncoderTopK

from .test_nodes import METRIC, prompts, randomized


def layer_sites(model):
    d = model.config.hidden_size
    return as_sites({
        "resid_0": (randomized(AutoEncoder(d, 64), 1), hook(model, 0, "resid")),
        "attn_1": (randomized(AutoEncoder(d, 32), 2), hook(model, 1, "attn_out")),
        "mlp_1": (randomized(AutoEncoderTopK(d, 48, 6, transcoder=True), 3, scale=0.1),
                  (hook(model, 1, "mlp_in"), hook(model, 1, "mlp_out"))),
        "resid_1": (randomized(AutoEncoder(d, 40), 4), hook(model, 1, "resid")),
    })


def weighted_node(state, store, site, row):
    """g_d * d of the downstream node `row` (example, position, node) in a run's values."""
    b, p, j = row
    gradient, values = state.gradients[site.name], store[site.name]
    if j < site.d_sae:
        return gradient.features[b, p, j] * values.features[b, p, j]
    return (gradient.error[b, p] * values.error[b, p]).sum()


def test_the_paper_layout_of_pairs(tiny_llama):
    sites = layer_sites(tiny_llama)
    assert edge_pairs(sites) == [
        ("resid_0", "attn_1", []), ("resid_0", "mlp_1", ["attn_1"]),
        ("resid_0", "resid_1", ["attn_1", "mlp_1"]), ("attn_1", "mlp_1", []),
        ("attn_1", "resid_1", ["mlp_1"]), ("mlp_1", "resid_1", [])]


def test_edges_are_derivatives_of_real_patched_runs(model64):
    sites = layer_sites(model64)
    by_name = {site.name: site for site in sites}
    clean, patch = prompts()
    state = node_state(model64, sites, clean, patch, METRIC)
    edges = edge_effects(model64, state=state, node_threshold=1e-3)
    _, base = run_metric(model64, sites, as_encoding(clean), METRIC)
    eps = 1e-5
    for upstream, downstream, frozen in edge_pairs(sites):
        found = edges[(upstream, downstream)]
        assert len(found.rows), (upstream, downstream)
        # rows are exactly the downstream nodes above the threshold
        table = torch.cat([state.effects.features[downstream],
                           state.effects.errors[downstream][..., None]], -1)
        assert len(found.rows) == int((table.abs() > 1e-3).sum())
        # no edge from a later upstream position
        later = torch.arange(found.values.shape[1])[None, :] > found.rows[:, 1:2]
        assert found.values[later].abs().max() == 0
        i = int(found.values.abs().sum((1, 2)).argmax())
        row = found.rows[i].tolist()
        held = {name: (lambda f, e, name=name: (state.clean[name].features,
                                                state.clean[name].error)) for name in frozen}
        delta = {"features": state.patch[upstream].features - state.clean[upstream].features,
                 "error": state.patch[upstream].error - state.clean[upstream].error}

        def whole(f, e):
            return f + eps * delta["features"], e + eps * delta["error"]
        _, moved = run_metric(model64, sites, as_encoding(clean), METRIC,
                              {upstream: whole, **held})
        finite = (weighted_node(state, moved, by_name[downstream], row)
                  - weighted_node(state, base, by_name[downstream], row)) / eps
        scale = found.values[i].abs().sum()
        assert abs(found.values[i].sum() - finite) < 1e-3 * scale + 1e-7, (upstream, downstream)
        # the largest single edge of that row
        q, k = (int(v) for v in torch.unravel_index(found.values[i].abs().argmax(),
                                                    found.values[i].shape))
        b = row[0]

        def single(f, e, q=q, k=k, b=b):
            f, e = f.clone(), e.clone()
            if k < by_name[upstream].d_sae:
                f[b, q, k] += eps * delta["features"][b, q, k]
            else:
                e[b, q] += eps * delta["error"][b, q]
            return f, e
        _, moved = run_metric(model64, sites, as_encoding(clean), METRIC,
                              {upstream: single, **held})
        finite = (weighted_node(state, moved, by_name[downstream], row)
                  - weighted_node(state, base, by_name[downstream], row)) / eps
        assert abs(found.values[i, q, k] - finite) < 3e-3 * abs(found.values[i, q, k]) + 1e-7


def test_aggregation_and_threshold(tiny_llama):
    sites = layer_sites(tiny_llama)
    clean, patch = prompts(seed=3)
    state = node_state(tiny_llama, sites, clean, patch, METRIC)
    edges = edge_effects(tiny_llama, state=state, node_threshold=1e-3,
                         pairs=[("resid_0", "resid_1", ["attn_1", "mlp_1"])], chunk=5)
    found = edges[("resid_0", "resid_1")]
    summed = found.summed().to_dense()
    assert summed.shape == (41, 65)
    expected = torch.zeros(41, 65, dtype=found.values.dtype)
    for row, values in zip(found.rows.tolist(), found.values):
        expected[row[2]] += values.sum(0) / 2
    torch.testing.assert_close(summed, expected)
    none = edge_effects(tiny_llama, state=state, node_threshold=float("inf"),
                        pairs=[("resid_0", "resid_1", [])])[("resid_0", "resid_1")]
    assert none.values.shape == (0, 6, 65) and none.summed()._nnz() == 0
    with pytest.raises(KeyError):
        edge_effects(tiny_llama, state=state, pairs=[("resid_0", "nowhere", [])])

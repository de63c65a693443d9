"""Circuits over an SCAE suite against independent truth: the replacement model against plain
PyTorch hooks that swap every module's output for its reconstruction; attribution there against
finite differences of those hooks' runs; the exact connection edges against the suite's dense
decomposition; and, with the norms' scales and the attention patterns held (the linearisation the
pruned pass is exact in), the attribution edges through the model against the exact edges."""

import contextlib

import pytest
import torch

from dictionary_learning import load_model
from dictionary_learning.circuits import edge_effects, node_state
from dictionary_learning.circuits import scae as circuits_scae
from dictionary_learning.models import norm_params
from dictionary_learning.scae import (
    Connections,
    all_connections,
    decompose,
    run_suite,
    sources_of,
    virtual_weights,
)
from dictionary_learning.scae.tracing import layer_points

from ..helpers import make_suite
from .test_nodes import METRIC, hooked_metric


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def eager64(request):
    return load_model(request.param, dtype=torch.float64, attn_implementation="eager")


def suite_of(model, connections="all"):
    suite = make_suite(model, n_layer=2).double()
    full = all_connections(suite, model)
    if connections == "all":
        suite.connections = full
        return suite
    generator = torch.Generator().manual_seed(5)
    indices = {name: torch.stack([torch.randperm(full.indices[name].shape[1],
                                                 generator=generator)[:7]
                                  for _ in range(suite[name].d_sae)])
               for name in suite.names}
    suite.connections = Connections(indices, {name: virtual_weights(suite, model, name, kept)
                                              for name, kept in indices.items()})
    return suite


def prompts(seed=2, batch=2, seq=6):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(5, 200, (batch, seq), generator=generator),
            torch.randint(5, 200, (batch, seq), generator=generator))


def plain_replacement_metric(model, suite, ids, edit=None):
    """The metric with every module's output swapped for its reconstruction by plain PyTorch
    forward hooks (`edit[name](codes)` changes a module's codes first)."""
    torch_model, handles = model._module, []
    for layer in range(suite.n_layers):
        points = layer_points(model, layer)
        for name, point in ((f"attn_{layer}", points.attn_out), (f"mlp_{layer}", points.mlp_out)):
            module, dictionary = torch_model.get_submodule(point.path), suite[name]

            def swap(module, args, out, dictionary=dictionary, change=(edit or {}).get(name)):
                x = args[0] if dictionary.transcoder else (out[0] if isinstance(out, tuple)
                                                           else out)
                codes = dictionary.encode(x)
                new = dictionary.decode(codes if change is None else change(codes))
                return (new, *out[1:]) if isinstance(out, tuple) else new
            handles.append(module.register_forward_hook(swap))
    return hooked_metric(model, ids, handles)


def test_the_replacement_model_and_its_node_effects(eager64):
    """The state's clean metric is the plain-hook replacement model's, its zero-ablated one every
    module writing decode(0); error nodes are exactly zero; each module's largest attribution
    effect is the limit of finite differences of plain-hook runs (one code moved eps of the way to
    zero); the last module's IG effects sum to zeroing it (before it, TopK selections downstream
    jump along the path, and IG misses the jumps)."""
    suite = suite_of(eager64)
    clean, _ = prompts()
    plain = plain_replacement_metric(eager64, suite, clean)
    zeroed = {name: torch.zeros_like for name in suite.names}
    state = circuits_scae.suite_node_state(suite, eager64, clean, None, METRIC)
    torch.testing.assert_close(state.effects.clean, plain)
    torch.testing.assert_close(state.effects.patched,
                               plain_replacement_metric(eager64, suite, clean, zeroed))
    for name in suite.names:
        assert float(state.effects.errors[name].abs().max()) == 0.0
        table = state.effects.features[name]
        where = tuple(int(i) for i in torch.unravel_index(table.abs().argmax(), table.shape))
        assert abs(table[where]) > 1e-4, name
        gaps = []
        for eps in (1e-3, 1e-4):
            def moved(codes, eps=eps, where=where):
                codes = codes.clone()
                codes[where] -= eps * codes[where]
                return codes
            finite = (plain_replacement_metric(eager64, suite, clean, {name: moved})
                      - plain)[where[0]] / eps
            gaps.append(abs(float(finite - table[where])))
        assert gaps[1] < 0.01 * abs(float(table[where])) + 1e-7, (name, gaps)
    last = suite.names[-1]
    truth = plain_replacement_metric(eager64, suite, clean, {last: torch.zeros_like}) - plain
    gaps = []
    for steps in (2, 24):
        effects = circuits_scae.suite_node_state(suite, eager64, clean, None, METRIC,
                                                 method="ig", steps=steps).effects
        gaps.append(float((effects.features[last].sum((1, 2)) - truth).abs().max()))
    assert truth.abs().max() > 1e-4 and gaps[1] < 1e-6 + 0.1 * gaps[0], gaps


def test_exact_edges_are_the_dense_decomposition(eager64):
    """With every connection kept and zero ablation, a node's exact edges from one source module,
    summed over positions and features, are -g [f > 0] times that module's term of the node's
    pre-activation in the suite's dense decomposition."""
    suite = suite_of(eager64)
    clean, _ = prompts()
    state = circuits_scae.suite_node_state(suite, eager64, clean, None, METRIC)
    exact = circuits_scae.connection_edges(suite, eager64, state)
    record, _ = run_suite(suite, eager64, state.clean_encoding, logits=False)
    assert set(exact) == {(source, name) for name in suite.names
                          for source in sources_of(name, eager64)}
    checked = 0
    for (upstream, downstream), edges in exact.items():
        terms = decompose(suite, eager64, record, downstream)[upstream]  # [batch, seq, d_sae]
        b, q, node = edges.rows.unbind(1)
        feature = node < suite[downstream].d_sae
        b, q, node = b[feature], q[feature], node[feature]
        gradient = state.gradients[downstream].features[b, q, node]
        active = state.clean[downstream].features[b, q, node] > 0
        expected = -gradient * active * terms[b, q, node]
        torch.testing.assert_close(edges.values[feature].sum((1, 2)), expected,
                                   atol=1e-9, rtol=1e-6)
        assert not edges.values[~feature].any()
        checked += int(active.sum())
    assert checked > 20


@contextlib.contextmanager
def held_scales_and_patterns(model, n_layers):
    """Plain PyTorch hooks that hold (detach) each suite layer's norm scale and the model's
    attention patterns: the derivative through the model is then the suite's linearisation."""
    torch_model, handles = model._module, []
    for layer in range(n_layers):
        points = layer_points(model, layer)
        for kind, point in (("attn", points.attn_norm_in), ("mlp", points.mlp_norm_in)):
            norm = norm_params(model, layer, kind)

            def held(module, args, out, norm=norm):
                x = args[0]
                bias = 0 if norm.bias is None else norm.bias
                return (norm.linear_part(x) * norm.scale(x).detach()[..., None] + bias).to(out)
            handles.append(torch_model.get_submodule(point.path).register_forward_hook(held))
    softmax = torch.nn.functional.softmax
    torch.nn.functional.softmax = lambda *args, **kwargs: softmax(*args, **kwargs).detach()
    try:
        yield
    finally:
        torch.nn.functional.softmax = softmax
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("connections", ["all", "seven"])
def test_attribution_edges_equal_exact_edges_in_the_linearisation(eager64, connections):
    """Norm scales and attention patterns held: the attribution edges (autograd through the model)
    equal the exact edges on the suite's connections, and are zero off them only when every
    connection is kept (with 7 per feature the connections carry part of the mass)."""
    suite = suite_of(eager64, connections)
    clean, patch = prompts()
    state = circuits_scae.suite_node_state(suite, eager64, clean, patch, METRIC)
    exact = circuits_scae.connection_edges(suite, eager64, state)
    with held_scales_and_patterns(eager64, suite.n_layers):
        attributed = edge_effects(eager64, state=state,
                                                pairs=circuits_scae.suite_pairs(suite, eager64))
    agreement = circuits_scae.edge_agreement(suite, eager64, exact, attributed)
    assert set(agreement) == set(exact)
    for pair, result in agreement.items():
        assert result.error_on_connections < 1e-6, (pair, result)
        if connections == "all":
            assert result.captured == pytest.approx(1.0) and result.error < 1e-6, (pair, result)
        else:
            assert 0.0 < result.captured < 1.0, (pair, result)
            assert result.correlation > 0.999999, (pair, result)
    # unheld, the model's own derivative differs from the linearisation's
    free = circuits_scae.suite_edges(suite, eager64, state)[2]
    assert max(result.error_on_connections for result in free.values()) > 1e-3


def test_bad_input_is_refused(eager64):
    suite = suite_of(eager64)
    clean, _ = prompts()
    kept = node_state(eager64, circuits_scae.suite_sites(suite, eager64), clean,
                                    None, METRIC)
    with pytest.raises(ValueError, match="replacement model"):
        circuits_scae.connection_edges(suite, eager64, kept)
    state = circuits_scae.suite_node_state(suite, eager64, clean, None, METRIC)
    suite.connections = None
    with pytest.raises(ValueError, match="no connections"):
        circuits_scae.connection_edges(suite, eager64, state)
    with pytest.raises(ValueError, match="errors must be one of"):
        node_state(eager64, circuits_scae.suite_sites(suite, eager64), clean,
                                 None, METRIC, errors="drop")
    with pytest.raises(ValueError, match="not a pair of the suite"):
        circuits_scae.connection_edges(suite_of(eager64), eager64, state,
                                       pairs=[("mlp_1", "attn_0", [])])

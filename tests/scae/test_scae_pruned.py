"""SCAE linearisation and pruned pass: the decomposition against dense pre-activations, and pruning
against contributions measured one source feature at a time."""

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning import load_model
from dictionary_learning.scae import SCAESuite, decompose, run_suite, sources_of

from ..helpers import CTX, make_suite, random_texts


def test_decomposition_equals_dense_pre_activations(eager_model):
    """With every source feature kept, the per-source terms + embedding + bias equal each
    module's dense encoder pre-activation in the recorded run, for attention SAEs and transcoders
    alike."""
    suite = make_suite(eager_model)
    record, _ = run_suite(suite, eager_model, random_texts(3, seed=21, max_words=8), ctx_len=CTX)
    for name in suite.names:
        module = suite[name]
        x = record.encoder_inputs[name]
        dense = F.linear(x if module.transcoder else x - module.b_dec, module.encoder.weight,
                         module.encoder.bias)
        terms = decompose(suite, eager_model, record, name)
        assert set(terms) == {*sources_of(name), "embedding", "bias"}
        total = sum(terms.values())
        mask = record.mask
        torch.testing.assert_close(total[mask], dense[mask], atol=1e-4, rtol=1e-4, msg=name)
        if sources_of(name):  # source features do contribute
            assert max(t[mask].abs().max() for k, t in terms.items()
                       if k not in ("embedding", "bias")) > 1e-3


def test_all_connections_reproduce_the_dense_suite(eager_model):
    """C = all: the pruned forward pass (each module from its sources' pruned codes) gives the
    recorded codes."""
    from dictionary_learning.scae import all_connections, pruned_forward

    suite = make_suite(eager_model)
    record, _ = run_suite(suite, eager_model, random_texts(3, seed=22, max_words=8), ctx_len=CTX)
    codes = pruned_forward(suite, eager_model, record, all_connections(suite, eager_model))
    for name in suite.names:
        torch.testing.assert_close(codes[name][record.mask], record.codes[name][record.mask],
                                   atol=1e-4, rtol=1e-4, msg=name)


def test_pruning_removes_exactly_the_unselected_contributions(eager_model):
    """With a random subset of connections and the recorded source codes, the pruned
    pre-activation of a feature equals the dense one minus the contributions of its unselected
    source features, each measured by running the decomposition with only that source feature
    switched on."""
    from dictionary_learning.scae import (
        Connections,
        all_connections,
        pruned_pre_activations,
        virtual_weights,
    )

    suite = make_suite(eager_model, n_layer=2)
    record, _ = run_suite(suite, eager_model, random_texts(2, seed=23, max_words=6), ctx_len=CTX)
    full = all_connections(suite, eager_model)
    generator = torch.Generator().manual_seed(3)
    for name in ("mlp_0", "attn_1", "mlp_1"):
        n_sources = full.indices[name].shape[1]
        keep = torch.stack([torch.randperm(n_sources, generator=generator)[:5]
                            for _ in range(suite[name].dict_size)])
        subset = Connections({name: keep}, {name: virtual_weights(suite, eager_model, name, keep)})
        pruned = pruned_pre_activations(suite, eager_model, record, subset, name, record.codes)
        dense = pruned_pre_activations(suite, eager_model, record, full, name, record.codes)
        sources = sources_of(name)
        sizes = [suite[source].dict_size for source in sources]
        for feature in (0, 7):
            removed = torch.zeros_like(dense[..., feature])
            kept = set(keep[feature].tolist())
            for j in range(n_sources):
                if j in kept:
                    continue
                module_index = next(i
                                    for i, end in enumerate(torch.tensor(sizes).cumsum(0).tolist())
                                    if j < end)
                local = j - sum(sizes[:module_index])
                only = {source: torch.zeros_like(record.codes[source]) for source in sources}
                source = sources[module_index]
                only[source][..., local] = record.codes[source][..., local]
                if only[source].abs().sum() == 0:
                    continue
                terms = decompose(suite, eager_model, record, name, source_codes=only)
                removed += terms[source][..., feature]
            mask = record.mask
            assert removed[mask].abs().max() > 1e-3  # pruning did remove something
            torch.testing.assert_close(pruned[..., feature][mask],
                                       (dense[..., feature] - removed)[mask], atol=1e-4, rtol=1e-4,
                                       msg=f"{name} feature {feature}")


@pytest.mark.slow
def test_smollm2_decomposition_and_all_connections():
    """On the real SmolLM2 (RoPE, 9 query heads over 3 key-value heads, RMSNorm): the decomposition
    equals every module's dense pre-activation, and the pruned pass with every connection kept
    reproduces the recorded codes."""
    from dictionary_learning.scae import all_connections, pruned_forward

    model = load_model("smollm2-135m", attn_implementation="eager")
    suite = SCAESuite.random(model, d_sae=128, k=8, n_layer=2, seed=0)
    record, _ = run_suite(suite, model, ["def add(a, b):\n    return a + b",
                                         "The cat sat on the mat."], ctx_len=16)
    mask = record.mask
    for name in suite.names:
        module = suite[name]
        x = record.encoder_inputs[name]
        dense = F.linear(x if module.transcoder else x - module.b_dec, module.encoder.weight,
                         module.encoder.bias)
        total = sum(decompose(suite, model, record, name).values())
        torch.testing.assert_close(total[mask], dense[mask], atol=1e-4, rtol=1e-4, msg=name)
    codes = pruned_forward(suite, model, record, all_connections(suite, model))
    for name in suite.names:
        torch.testing.assert_close(codes[name][mask], record.codes[name][mask], atol=1e-4,
                                   rtol=1e-4, msg=name)

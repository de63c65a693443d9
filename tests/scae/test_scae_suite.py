"""SCAE suite and connections: the container, its folder, and clear errors for connections that do
not fit."""

import pytest
import torch

from dictionary_learning import load_model
from dictionary_learning.scae import SCAESuite, run_suite

from ..helpers import CTX, make_suite, random_texts


def test_suite_save_load_and_errors(tmp_path, tiny_llama):
    from dictionary_learning.scae import Connections, all_connections

    suite = make_suite(tiny_llama, n_layer=2)
    suite.save(tmp_path / "bare")
    assert SCAESuite.load(tmp_path / "bare").connections is None
    suite.connections = all_connections(suite, tiny_llama)
    suite.save(tmp_path / "suite")
    loaded = SCAESuite.load(tmp_path / "suite")
    x = torch.randn(4, 64)
    for name in suite.names:
        torch.testing.assert_close(loaded[name](x), suite[name](x))
        assert torch.equal(loaded.connections.indices[name], suite.connections.indices[name])
        assert torch.equal(loaded.connections.weights[name], suite.connections.weights[name])
    wrong = Connections({n: i[:5] for n, i in suite.connections.indices.items()},
                        suite.connections.weights)
    with pytest.raises(ValueError,
                       match=r"attn_0: expected indices of shape \[96, C\], got \(5, 0\)"):
        SCAESuite(dict(suite.dictionaries.items()), connections=wrong)
    modules = dict(suite.dictionaries.items())
    with pytest.raises(ValueError, match="expected \\['attn_0', 'mlp_0', 'attn_1', 'mlp_1'\\]"):
        SCAESuite({k: v for k, v in modules.items() if k != "mlp_1"})
    wrong = SCAESuite.random(load_model("tiny-gpt2"), d_sae=16, k=2, n_layer=1)
    with pytest.raises(ValueError, match="width is 64"):
        wrong.check_model(tiny_llama)
    # the linearisation multiplies the suite's weights by the model's: one dtype, or a clear error
    # (every door that takes a model: run_suite, all_connections, random_connections)
    bf16 = load_model("tiny-llama", dtype=torch.bfloat16, attn_implementation="eager")
    with pytest.raises(ValueError, match="parameters are float32, the model.s bfloat16"):
        all_connections(suite, bf16)
    with pytest.raises(ValueError, match="not a saved SCAESuite"):
        SCAESuite.load(tmp_path)


def test_bad_connections_raise(eager_model):
    from dictionary_learning.scae import Connections, all_connections, pruned_forward

    suite = make_suite(eager_model, n_layer=2)
    record, _ = run_suite(suite, eager_model, random_texts(1, seed=26, max_words=4), ctx_len=CTX)
    full = all_connections(suite, eager_model)
    broken = Connections(dict(full.indices), dict(full.weights))
    broken.indices["mlp_1"] = broken.indices["mlp_1"].clone()
    broken.indices["mlp_1"][0, 0] = 10_000
    with pytest.raises(ValueError, match=r"mlp_1: connection indices must lie in \[0, 288\)"):
        pruned_forward(suite, eager_model, record, broken)
    broken.indices["mlp_1"][0, 0] = broken.indices["mlp_1"][0, 1]
    with pytest.raises(ValueError, match="mlp_1: a feature lists the same source feature twice"):
        pruned_forward(suite, eager_model, record, broken)
    broken.indices["mlp_1"] = full.indices["mlp_1"][:, :3]
    with pytest.raises(ValueError,
                       match=r"mlp_1: weights of shape \(96, 288\) do not match indices \(96, 3\)"):
        pruned_forward(suite, eager_model, record, broken)


def test_renamed_names_name_their_new_names(tiny_llama):
    """A module's sources are the earlier modules whose features it reads ("upstream" means Marks'
    dictionary_learning in this package): the wing's old names for them fail naming the new ones."""
    import dictionary_learning.scae as scae
    import dictionary_learning.scae.suite as suite_module
    from dictionary_learning.scae import pair_contributions, pruned_pre_activations

    for module in (scae, suite_module):
        with pytest.raises(AttributeError, match="upstream_of was renamed sources_of"):
            module.upstream_of  # noqa: B018
        assert not hasattr(module, "upstream_of")
    suite = make_suite(tiny_llama, n_layer=1)
    assert suite.n_sources("mlp_0") == suite["attn_0"].dict_size
    with pytest.raises(AttributeError, match="SCAESuite.n_upstream was renamed n_sources"):
        suite.n_upstream("mlp_0")
    for call, old, new in ((scae.decompose, "upstream_codes", "source_codes"),
                           (pruned_pre_activations, "upstream_codes", "source_codes"),
                           (pair_contributions, "up", "source")):
        with pytest.raises(TypeError, match=f"{old} was renamed {new}"):
            call(suite, tiny_llama, None, "mlp_0", **{old: None})

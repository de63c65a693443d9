"""SCAE: the suite run against plain forward hooks, and the linear decomposition against dense pre-activations."""

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning import load_model
from dictionary_learning.models import get_adapter
from dictionary_learning.scae import SCAESuite, decompose, run_suite, upstream_of

from .helpers import random_texts

CTX = 24


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def eager_model(request):
    return load_model(request.param, attn_implementation="eager")


def make_suite(model, n_layer=3, seed=0):
    suite = SCAESuite.random(model, dict_size=96, k=8, n_layer=n_layer, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases, so every bias path is exercised
        for module in suite.dictionaries.values():
            module.b_dec.copy_(0.1 * torch.randn(module.b_dec.shape, generator=generator))
            module.encoder.bias.copy_(0.1 * torch.randn(module.encoder.bias.shape, generator=generator))
    return suite


def test_run_suite_patches_every_module(eager_model):
    """The logits equal a plain PyTorch run whose forward hooks replace each attention output and MLP output by
    the suite's reconstructions, each text run alone."""
    suite = make_suite(eager_model)
    texts = random_texts(3, seed=20, max_words=8)
    record, logits = run_suite(suite, eager_model, texts, ctx_len=CTX)
    adapter, torch_model = get_adapter(eager_model), eager_model._module
    handles = []
    for layer in range(suite.n_layers):
        attn = torch_model.get_submodule(f"{adapter.block(layer)}.{adapter.attn}")
        mlp = torch_model.get_submodule(f"{adapter.block(layer)}.{adapter.mlp}")
        sae, transcoder = suite[f"attn_{layer}"], suite[f"mlp_{layer}"]
        handles.append(attn.register_forward_hook(lambda m, a, out, sae=sae: (sae(out[0]), *out[1:])))
        handles.append(mlp.register_forward_hook(lambda m, a, out, t=transcoder: t(a[0])))
    try:
        with torch.no_grad():
            for row, text in enumerate(texts):
                ids = eager_model.tokenizer(text, return_tensors="pt", truncation=True, max_length=CTX)["input_ids"]
                expected = torch_model(ids).logits[0]
                got = logits[row][record.mask[row]]
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        for handle in handles:
            handle.remove()


def test_decomposition_equals_dense_pre_activations(eager_model):
    """With every upstream feature kept, the per-upstream terms + embedding + bias equal each module's dense
    encoder pre-activation in the recorded run, for attention SAEs and transcoders alike."""
    suite = make_suite(eager_model)
    record, _ = run_suite(suite, eager_model, random_texts(3, seed=21, max_words=8), ctx_len=CTX)
    for name in suite.names:
        module = suite[name]
        x = record.encoder_inputs[name]
        dense = F.linear(x if module.transcoder else x - module.b_dec, module.encoder.weight, module.encoder.bias)
        terms = decompose(suite, eager_model, record, name)
        assert set(terms) == {*upstream_of(name), "embedding", "bias"}
        total = sum(terms.values())
        mask = record.mask
        torch.testing.assert_close(total[mask], dense[mask], atol=1e-4, rtol=1e-4, msg=name)
        if upstream_of(name):  # upstream features do contribute
            assert max(t[mask].abs().max() for k, t in terms.items() if k not in ("embedding", "bias")) > 1e-3


def test_suite_save_load_and_errors(tmp_path, tiny_llama):
    suite = make_suite(tiny_llama, n_layer=2)
    suite.save(tmp_path / "suite")
    loaded = SCAESuite.load(tmp_path / "suite")
    x = torch.randn(4, 64)
    for name in suite.names:
        torch.testing.assert_close(loaded[name](x), suite[name](x))
    modules = dict(suite.dictionaries.items())
    with pytest.raises(ValueError, match="expected \\['attn_0', 'mlp_0', 'attn_1', 'mlp_1'\\]"):
        SCAESuite({k: v for k, v in modules.items() if k != "mlp_1"})
    wrong = SCAESuite.random(load_model("tiny-gpt2"), dict_size=16, k=2, n_layer=1)
    with pytest.raises(ValueError, match="width is 64"):
        wrong.check_model(tiny_llama)
    with pytest.raises(ValueError, match="not a saved SCAESuite"):
        SCAESuite.load(tmp_path)

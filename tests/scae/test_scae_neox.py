"""The SCAE linearisation on GPT-NeoX (Pythia): per-head OV weights read from the packed
query_key_value against the value states the module computes, the parallel residual (a layer's MLP
reads the block input, so it is not downstream of the same layer's attention), and the decomposition
adding up to the dense pre-activations in both residual modes, with C = all reproducing the dense
suite's codes."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning.models import (
    attention_ov,
    byte_tokenizer,
    load_model,
    norm_params,
    torch_model,
)
from dictionary_learning.models.adapters import parallel_residual
from dictionary_learning.scae import (
    all_connections,
    decompose,
    pruned_forward,
    run_suite,
    sources_of,
)

from ..helpers import make_suite, random_texts

CTX = 10


@functools.cache
def neox(mode: str):
    """tiny-gptneox (parallel residual), or a small sequential GPT-NeoX with the same features
    (partial rotary, biases, perturbed norms), built from its config."""
    if mode == "parallel":
        return load_model("tiny-gptneox", attn_implementation="eager")
    import tempfile

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from dictionary_learning.models.loading import TINY_VOCAB, _perturb_norms_and_biases

    config = GPTNeoXConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25,
        use_parallel_residual=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    _perturb_norms_and_biases(model, torch.Generator().manual_seed(0))
    path = tempfile.mkdtemp(prefix="tiny_neox_sequential_")
    model.save_pretrained(path)
    byte_tokenizer(add_bos=False).save_pretrained(path)
    return load_model(path, attn_implementation="eager")


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_ov_weights_give_the_modules_value_states(mode):
    """W_V, b_V: head h's value states as query_key_value packs them (per head: q, k, v); W_O, b_O:
    dense."""
    model = neox(mode)
    attn = torch_model(model).gpt_neox.layers[1].attention
    config = torch_model(model).config
    n_heads = config.num_attention_heads
    d_head = config.hidden_size // n_heads
    x = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ov = attention_ov(model, 1)
        # [tokens, heads, d_head]
        values = attn.query_key_value(x).view(5, n_heads, 3 * d_head)[..., 2 * d_head :]
        assert ov.b_V is not None and ov.b_V.abs().max() > 0  # the bias path is exercised
        torch.testing.assert_close(torch.einsum("td,hde->the", x, ov.W_V) + ov.b_V, values,
                                   rtol=1e-5, atol=1e-5)
        z = torch.randn(n_heads, d_head, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(torch.einsum("he,hed->d", z, ov.W_O) + ov.b_O,
                                   attn.dense(z.reshape(-1)), rtol=1e-5, atol=1e-5)


def test_parallel_residual_drops_the_same_layers_attention():
    model = neox("parallel")
    assert parallel_residual(model) and not parallel_residual(neox("sequential"))
    assert sources_of("mlp_1", model) == ["attn_0", "mlp_0"]
    assert sources_of("attn_1", model) == ["attn_0", "mlp_0"]
    # without the model: execution order, unchanged
    assert sources_of("mlp_1") == ["attn_0", "mlp_0", "attn_1"]
    assert sources_of("mlp_1", neox("sequential")) == ["attn_0", "mlp_0", "attn_1"]
    assert sources_of("mlp_1", load_model("tiny-llama")) == ["attn_0", "mlp_0", "attn_1"]


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_decomposition_equals_dense_and_all_connections_reproduce_the_suite(mode):
    """Every module's terms add up to F.linear of what its encoder read in the patched run; the
    pruned pass with every connection kept gives the dense suite's codes."""
    model = neox(mode)
    suite = make_suite(model, n_layer=2)
    record, _ = run_suite(suite, model, random_texts(3, seed=21, max_words=8), ctx_len=CTX,
                          logits=False)
    mask, worst, worst_abs = record.mask, 0.0, 0.0
    for name in suite.names:
        dictionary, x = suite[name], record.encoder_inputs[name]
        dense = F.linear(x if dictionary.transcoder else x - dictionary.b_dec,
                         dictionary.encoder.weight, dictionary.encoder.bias).double()
        terms = decompose(suite, model, record, name)
        assert set(terms) == {*sources_of(name, model), "embedding", "bias"}
        total = sum(term.double() for term in terms.values())
        error = float((total - dense)[mask].abs().max().detach())
        worst, worst_abs = (max(worst, error / float(dense[mask].abs().max().detach())),
                            max(worst_abs, error))
        torch.testing.assert_close(total[mask], dense[mask], atol=1e-4, rtol=1e-4,
                                   msg=f"{mode} {name}")
    print(f"{mode}: largest decomposition error {worst_abs:.2e} ({worst:.2e} of the largest "
          "pre-activation)")
    codes = pruned_forward(suite, model, record, all_connections(suite, model))
    for name in suite.names:
        torch.testing.assert_close(codes[name][mask], record.codes[name][mask], atol=1e-4,
                                   rtol=1e-4, msg=name)


def test_execution_order_sources_are_wrong_for_a_parallel_residual():
    """A negative control: adding layer 1's attention output to layer 1's transcoder input (as a
    sequential block would) moves the sum far from the dense pre-activation, which the parallel
    routing matches."""
    model = neox("parallel")
    suite = make_suite(model, n_layer=2)
    record, _ = run_suite(suite, model, random_texts(2, seed=5, max_words=6), ctx_len=CTX,
                          logits=False)
    x, mask = record.encoder_inputs["mlp_1"], record.mask
    dense = F.linear(x, suite["mlp_1"].encoder.weight, suite["mlp_1"].encoder.bias)
    routed = sum(decompose(suite, model, record, "mlp_1").values())
    # [b, t, d]
    attn_out = record.codes["attn_1"] @ suite["attn_1"].decoder.weight.t() + suite["attn_1"].b_dec
    norm = norm_params(model, 1, "mlp")
    leaked = ((record.norm_scales["mlp_1"][..., None] * norm.linear_part(attn_out))
              @ suite["mlp_1"].encoder.weight.t())
    torch.testing.assert_close(routed[mask], dense[mask], atol=1e-4, rtol=1e-4)
    assert (routed + leaked - dense)[mask].abs().max() > 1e-2

"""Models and hook points: each named site must be the quantity its name says, checked by identities
of the pre-norm residual stream computed from plain forward hooks and Hugging Face's own hidden
states."""

import math

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning import get_adapter, hook, load_model
from dictionary_learning.models import (
    HookPoint,
    buffer_io,
    get_module,
    resolve_hook,
    submodule_points,
)

from ..helpers import hook_reference

TEXT = ["Once upon a time, a small river ran under an old stone bridge near the city."]


def _norm(module, x):
    if isinstance(module, torch.nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    return module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_sites_are_what_they_say(tiny_model):
    layer = 1
    points = [hook(tiny_model, layer, s) for s in ("attn_out", "mlp_in", "mlp_out", "resid")]
    attn_out, mlp_in, mlp_out, resid = hook_reference(tiny_model, TEXT, points, ctx_len=256)
    ids = tiny_model.tokenizer(TEXT[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = tiny_model._module(ids, output_hidden_states=True).hidden_states
    resid_pre, resid_post = hidden[layer][0], hidden[layer + 1][0]
    torch.testing.assert_close(resid, resid_post)  # resid = the block's output
    torch.testing.assert_close(resid_pre + attn_out + mlp_out, resid_post, atol=1e-5, rtol=1e-5)
    norm = get_module(tiny_model,
                      f"{get_adapter(tiny_model).block(layer)}.{get_adapter(tiny_model).mlp_norm}")
    torch.testing.assert_close(mlp_in, _norm(norm, resid_pre + attn_out), atol=1e-5, rtol=1e-5)


def test_hook_errors(tiny_llama):
    with pytest.raises(ValueError,
                       match=r"valid sites: \['resid', 'attn_out', 'mlp_in', 'mlp_out'\]"):
        hook(tiny_llama, 0, "mlp")
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 3\]"):
        hook(tiny_llama, 4, "resid")
    with pytest.raises(ValueError, match="model.layers.0.self_attn"):
        get_module(tiny_llama, "model.layers.0.attn")
    with pytest.raises(ValueError, match="io must be"):
        resolve_hook(tiny_llama, "model.layers.0", io="out")


def test_buffer_io_and_hook_points_translate_both_ways(tiny_llama):
    """Upstream's io ("out" / "in" / "in_to_out", or "in_and_out") reads the hook points it names,
    and buffer_io gives back the io that reads them (the value saved in configs)."""
    mlp = "model.layers.0.mlp"
    expected = {"out": (HookPoint(mlp, "output"),), "in": (HookPoint(mlp, "input"),),
                "in_to_out": (HookPoint(mlp, "input"), HookPoint(mlp, "output")),
                "in_and_out": (HookPoint(mlp, "input"), HookPoint(mlp, "output"))}
    for io, points in expected.items():
        assert submodule_points(tiny_llama, mlp, io) == points
        assert buffer_io([point.io for point in points]) == {"in_and_out": "in_to_out"}.get(io, io)
    pair = (hook(tiny_llama, 0, "mlp_in"), hook(tiny_llama, 0, "resid"))
    assert submodule_points(tiny_llama, pair, "in_to_out") == pair
    with pytest.raises(ValueError, match="io must be one of"):
        submodule_points(tiny_llama, mlp, "both")
    with pytest.raises(ValueError, match="needs io='in_to_out'"):
        submodule_points(tiny_llama, pair, "out")


def test_tiny_models_are_seeded_and_distinct():
    a, b, c = (load_model("tiny-gpt2", seed=0), load_model("tiny-gpt2", seed=0),
               load_model("tiny-gpt2", seed=1))
    wa, wb, wc = (m._module.transformer.h[0].mlp.c_fc.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert (get_adapter(a).family == "gpt2"
            and get_adapter(load_model("tiny-llama")).family == "llama")


def test_tiny_model_dtype():
    model = load_model("tiny-llama", dtype=torch.bfloat16)
    assert next(model._module.parameters()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="torch.dtype"):
        load_model("tiny-llama", dtype="float32")


def test_unknown_model_fails_fast(tmp_path):
    with pytest.raises(Exception):
        load_model(str(tmp_path / "no-such-model"))


ENGLISH = (
    "The history of the city goes back more than two thousand years. It was founded on the banks "
    "of a wide river, where merchants could load their boats with grain and wool. Over the "
    "centuries the town grew into a busy port, and by the middle ages it had become one of the "
    "richest places in the country. Today it is known for its old churches, its narrow streets and "
    "its famous university, which attracts students from all over the world."
)


@pytest.mark.slow
def test_smollm2_is_a_trained_model(smollm2):
    model = smollm2
    torch_model = model._module
    assert get_adapter(model).family == "llama" and torch_model.config.num_hidden_layers == 30
    ids = model.tokenizer(ENGLISH, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = torch_model(ids).logits
    loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()
    uniform = math.log(torch_model.config.vocab_size)  # ~10.8 nats
    assert loss < 4.0, f"loss {loss:.2f} nats/token is not that of a trained model"
    # a shuffled text is much harder to predict: the model uses context
    shuffled = ids[0,
                   torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))][None]
    with torch.no_grad():
        shuffled_loss = F.cross_entropy(torch_model(shuffled).logits[0, :-1].float(),
                                        shuffled[0, 1:]).item()
    assert loss < shuffled_loss - 2 and shuffled_loss < uniform


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_norm_and_attention_weights_rebuild_the_block(name):
    """norm_params and attention_ov (grouped-query heads expanded) recompute the attention output
    from the attention patterns, and the MLP input from the residual stream, exactly as the model
    does."""
    from dictionary_learning.models import attention_ov, norm_params

    model = load_model(name, attn_implementation="eager")
    adapter, layer = get_adapter(model), 1
    block = f"{adapter.block(layer)}"
    points = [hook(model, layer, "attn_out"), hook(model, layer, "mlp_in")]
    attn_norm_out, attn_out, mlp_in = hook_reference(
        model, TEXT, [get_norm_point(block, adapter.attn_norm), *points], ctx_len=256)
    patterns = []
    attn = get_module(model, f"{block}.{adapter.attn}")
    handle = attn.register_forward_hook(lambda m, args, out: patterns.append(out[1][0]))
    ids = model.tokenizer(TEXT[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        resid_pre = model._module(ids, output_hidden_states=True).hidden_states[layer][0]
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(norm_params(model, layer, "attn")(resid_pre), attn_norm_out,
                                   atol=1e-5, rtol=1e-5)
        ov = attention_ov(model, layer)
        values = torch.einsum("kd,hde->hke", attn_norm_out, ov.W_V)
        if ov.b_V is not None:
            values = values + ov.b_V[:, None]
        rebuilt = torch.einsum("hqk,hke,hed->qd", patterns[0], values, ov.W_O)
        if ov.b_O is not None:
            rebuilt = rebuilt + ov.b_O
        torch.testing.assert_close(rebuilt, attn_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norm_params(model, layer, "mlp")(resid_pre + attn_out), mlp_in,
                                   atol=1e-5, rtol=1e-5)
    if name == "tiny-llama":
        # 2 kv heads shared by 4
        assert ov.W_V.shape == (4, 64, 16) and torch.equal(ov.W_V[0], ov.W_V[1])


def get_norm_point(block, norm):
    from dictionary_learning.models import HookPoint

    return HookPoint(f"{block}.{norm}", "output")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gptneox"])
def test_many_points_of_one_layer_read_in_one_trace(name):
    """Every site of a layer, plus modules that run in another order than they are registered
    (GPT-NeoX's post-attention norm runs after its attention) or whose output is also their block's
    last module's (GPT-2's MLP and its block), read in one trace: each equals a plain forward
    hook."""
    from dictionary_learning.models import HookPoint
    from dictionary_learning.tracing import read_hook_points, token_mask, tokenize

    model = load_model(name)
    points = [hook(model, 1, site) for site in ("resid", "attn_out", "mlp_in", "mlp_out")]
    points += [HookPoint(get_adapter(model).layers + ".1", "output")]
    if name == "tiny-gptneox":
        points += [HookPoint("gpt_neox.layers.1.post_attention_layernorm", "output"),
                   HookPoint("gpt_neox.layers.1.attention", "output")]
    texts = ["a river ran under the old stone bridge", "bright morning"]
    encoding = tokenize(model.tokenizer, texts, 16)
    values = read_hook_points(model, encoding, points)
    mask = token_mask(encoding, remove_bos=False)
    for point, value, expected in zip(points, values, hook_reference(model, texts, points, 16)):
        torch.testing.assert_close(value[mask], expected, atol=1e-4, rtol=1e-4, msg=str(point))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gptneox"])
def test_adapter_paths_exist(name):
    """Every module the family adapter names is in the model, and the unembedding is the output
    embedding."""
    model = load_model(name)
    adapter = get_adapter(model)
    for path in (adapter.layers, adapter.embed, adapter.final_norm, adapter.unembed):
        get_module(model, path)
    assert get_module(model, adapter.unembed) is model._module.get_output_embeddings()

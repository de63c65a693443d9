"""One suite over every model family: hook points read through the toolkit equal plain PyTorch
forward hooks on the modules that truly compute them, an exact reconstruction recovers all of the
loss, norms and OV weights match the modules' own forwards, the SCAE decomposition adds up (or the
family is refused by name), and a family without an adapter is refused by name.

A new family is one line in FAMILIES (its tiny model, and the reference module names written from
transformers' modeling code, independently of `models/adapters.py`).
"""

from __future__ import annotations

import functools

import pytest
import torch

from dictionary_learning import evaluation, tracing
from dictionary_learning.dictionary import IdentityDict
from dictionary_learning.models import (
    SITES,
    attention_ov,
    byte_tokenizer,
    get_adapter,
    hook,
    load_model,
    norm_params,
    torch_model,
)

from ..helpers import random_texts

# tiny model -> (decoder blocks, MLP module, the norm whose input is the residual stream between
# attention and the MLP, or None for a parallel residual: attention and MLP both read the block
# input and both outputs are added)
FAMILIES = {
    "tiny-llama": ("model.layers", "mlp", "post_attention_layernorm"),
    "tiny-gpt2": ("transformer.h", "mlp", "ln_2"),
    "tiny-gptneox": ("gpt_neox.layers", "mlp", None),
    "tiny-gemma": ("model.layers", "mlp", "post_attention_layernorm"),
    "tiny-gemma2": ("model.layers", "mlp", "pre_feedforward_layernorm"),
    "tiny-qwen2": ("model.layers", "mlp", "post_attention_layernorm"),
    "tiny-mistral": ("model.layers", "mlp", "post_attention_layernorm"),
    "tiny-phi3": ("model.layers", "mlp", "post_attention_layernorm"),
    "tiny-olmo": ("model.layers", "mlp", "post_attention_layernorm"),
}
NAMES = list(FAMILIES)
# SCAE refuses these by name (Gemma 2's post-norms are not routed yet)
NOT_DECOMPOSED = {"tiny-gemma2"}
LAYER = 1
CTX = 12


@functools.cache
def family_model(name: str):
    return load_model(name)


@functools.cache
def encoding_for(name: str) -> dict[str, torch.Tensor]:
    # different lengths: left padding is exercised
    texts = random_texts(3, seed=1, min_words=1, max_words=6)
    return tracing.tokenize(family_model(name).tokenizer, texts, CTX)


def first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def reference_sites(name: str, layer: int) -> dict[str, torch.Tensor]:
    """The four sites from plain forward hooks on the Hugging Face model: resid = the block's
    output, mlp_in = what the MLP module receives, attn_out / mlp_out = what attention / the MLP add
    to the residual stream (differences of the residual stream around them; for a parallel residual,
    the attention and MLP modules' outputs)."""
    layers_path, mlp_name, mid_norm = FAMILIES[name]
    hf = torch_model(family_model(name))
    block = hf.get_submodule(f"{layers_path}.{layer}")
    seen: dict[str, torch.Tensor] = {}

    def keep_input(key):  # hooks return None: they only record
        def pre_hook(module, args, kwargs):
            seen.setdefault(key, (args[0] if args else kwargs["hidden_states"]).clone())
        return pre_hook

    def keep_output(key):
        def post_hook(module, args, out):
            seen.setdefault(key, first(out).clone())
        return post_hook

    mlp = block.get_submodule(mlp_name)
    handles = [
        block.register_forward_pre_hook(keep_input("pre"), with_kwargs=True),
        block.register_forward_hook(keep_output("post")),
        mlp.register_forward_pre_hook(keep_input("mlp_in"), with_kwargs=True),
        mlp.register_forward_hook(keep_output("mlp")),
    ]
    if mid_norm is not None:
        handles.append(block.get_submodule(mid_norm).register_forward_pre_hook(keep_input("mid"),
                                                                               with_kwargs=True))
    else:
        attn = next(m for n, m in block.named_children() if n in ("attention", "self_attn", "attn"))
        handles.append(attn.register_forward_hook(keep_output("attn")))
    try:
        with torch.no_grad():
            hf(**tracing.model_inputs(encoding_for(name)))
    finally:
        for handle in handles:
            handle.remove()
    if mid_norm is not None:
        attn_out, mlp_out = seen["mid"] - seen["pre"], seen["post"] - seen["mid"]
    else:
        attn_out, mlp_out = seen["attn"], seen["mlp"]
        torch.testing.assert_close(attn_out + mlp_out, seen["post"] - seen["pre"], rtol=1e-4,
                                   atol=1e-5)
    return {"resid": seen["post"], "attn_out": attn_out, "mlp_in": seen["mlp_in"],
            "mlp_out": mlp_out}


@pytest.mark.parametrize("name", NAMES)
def test_sites_equal_plain_forward_hooks(name):
    model = family_model(name)
    points = [hook(model, LAYER, site) for site in SITES]
    # all four sites in one trace
    read = tracing.read_hook_points(model, encoding_for(name), points)
    expected = reference_sites(name, LAYER)
    mask = encoding_for(name)["attention_mask"].bool()
    for site, value in zip(SITES, read):
        scale = expected[site][mask].abs().max().item()
        torch.testing.assert_close(value[mask], expected[site][mask], rtol=1e-4,
                                   atol=1e-5 * max(scale, 1.0),
                                   msg=lambda m, site=site: f"{name} {site}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_exact_reconstruction_recovers_all_loss(name):
    model = family_model(name)
    texts = random_texts(4, seed=2, min_words=2, max_words=8)
    point = hook(model, LAYER, "mlp_out")
    dictionary = IdentityDict(torch_model(model).config.hidden_size)  # an exact reconstruction
    x = torch.randn(7, dictionary.activation_dim)
    assert torch.equal(dictionary(x), x)
    result = evaluation.patched_losses(texts, model, dictionary, (point,), ctx_len=CTX)
    # zeroing the site must matter for the ratio
    assert abs(result["ce_zero"] - result["ce_clean"]) > 1e-3, result
    assert abs(result["frac_recovered"] - 1) < 1e-4, result
    assert (abs(result["ce_patched"] - result["ce_clean"]) < 1e-5
            and result["kl_patched"] < 1e-6), result


@pytest.mark.parametrize("name", NAMES)
def test_norm_params_match_the_norm_modules(name):
    """NormParams (formula: weight, 1 + w, centring, bias, eps) reproduces each pre-norm's forward,
    or the family is refused by name for the decomposition."""
    model = family_model(name)
    hf, adapter = torch_model(model), get_adapter(model)
    x = torch.randn(2, 5, hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    # token norms from 0.003 to 3: eps matters at the small ones
    x = x * torch.logspace(-2.5, 0.5, 5)[:, None]
    if adapter.not_decomposable:
        with pytest.raises(ValueError, match=adapter.family):
            norm_params(model, LAYER, "mlp")
        with pytest.raises(ValueError, match=adapter.family):
            attention_ov(model, LAYER)
        cases = [(None, "final", adapter.final_norm)]
    else:
        block = adapter.block(LAYER)
        cases = [(LAYER, "attn", f"{block}.{adapter.attn_norm}"), (LAYER, "mlp",
                                                                   f"{block}.{adapter.mlp_norm}"),
                 (None, "final", adapter.final_norm)]
    with torch.no_grad():
        for layer, which, path in cases:
            torch.testing.assert_close(norm_params(model, layer, which)(x),
                                       hf.get_submodule(path)(x), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, which=which: f"{name} {which}: {m}")


def test_fused_qkv_value_weights():
    """Phi-3's per-head OV weights read from qkv_proj give the value states its attention
    computes."""
    model = family_model("tiny-phi3")
    hf = torch_model(model)
    attn = hf.model.layers[LAYER].self_attn
    config = hf.config
    n_heads, n_kv, d_head = (config.num_attention_heads, config.num_key_value_heads,
                             config.hidden_size // 4)
    x = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        qkv = attn.qkv_proj(x)
        # [tokens, kv heads, d_head]
        values = qkv[:, (n_heads + n_kv) * d_head:].view(5, n_kv, d_head)
        ov = attention_ov(model, LAYER)
        per_head = torch.einsum("td,hde->the", x, ov.W_V) + (ov.b_V if ov.b_V is not None else 0)
        expected = values.repeat_interleave(n_heads // n_kv, dim=1)
        torch.testing.assert_close(per_head, expected, rtol=1e-5, atol=1e-6)
        # W_O: head h's slice of o_proj's input columns
        z = torch.randn(n_heads, d_head, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(torch.einsum("he,hed->d", z, ov.W_O), attn.o_proj(z.reshape(-1)),
                                   rtol=1e-5, atol=1e-6)


def tiny_unknown(tmp_path, class_name: str, **own):
    import transformers
    from transformers import AutoModelForCausalLM

    config = getattr(transformers, class_name)(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, **own,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    return load_model(str(tmp_path))


@pytest.mark.parametrize("class_name,family,own", [
    # a mixture-of-experts MLP
    ("MixtralConfig", "mixtral", {"num_local_experts": 2, "num_experts_per_tok": 1}),
    ("CohereConfig", "cohere", {}),  # a family with no adapter
])
def test_unknown_family_is_refused_by_name(tmp_path, class_name, family, own):
    # loading works: nothing needs the adapter yet
    model = tiny_unknown(tmp_path, class_name, **own)
    with pytest.raises(ValueError, match=f"'{family}'"):
        hook(model, 0, "mlp_out")
    with pytest.raises(ValueError, match=f"'{family}'"):
        evaluation.loss_recovered(["some text"], model, "layers.0.mlp_out", IdentityDict())


@pytest.mark.parametrize("name", NAMES)
def test_scae_decomposition_equals_dense_or_family_refused(name):
    """With every source feature kept, the SCAE decomposition of each module's encoder
    pre-activation adds up to the dense one (the Gemma norm's 1 + w, OLMo's weightless LayerNorm and
    Phi-3's fused q | k | v included), or the family is refused by name; never a silently wrong
    sum."""
    import torch.nn.functional as F

    from dictionary_learning.scae import decompose, run_suite

    from ..helpers import make_suite

    model = load_model(name, attn_implementation="eager")
    family = get_adapter(model).family
    suite = make_suite(model, n_layer=2)
    if name in NOT_DECOMPOSED:
        with pytest.raises(ValueError, match=family):
            record, _ = run_suite(suite, model, random_texts(3, seed=21, max_words=8), ctx_len=CTX)
            decompose(suite, model, record, suite.names[0])
        return
    record, _ = run_suite(suite, model, random_texts(3, seed=21, max_words=8), ctx_len=CTX)
    terms = {module: decompose(suite, model, record, module) for module in suite.names}
    for module, pieces in terms.items():
        dictionary, x = suite[module], record.encoder_inputs[module]
        dense = F.linear(x if dictionary.transcoder else x - dictionary.b_dec,
                         dictionary.encoder.weight, dictionary.encoder.bias)
        torch.testing.assert_close(sum(pieces.values())[record.mask], dense[record.mask], atol=1e-4,
                                   rtol=1e-4, msg=lambda m, module=module: f"{name} {module}: {m}")


@pytest.mark.parametrize("name", [name for name in NAMES if name not in NOT_DECOMPOSED])
def test_all_connections_reproduce_the_dense_suite(name):
    """The pruned pass with every connection kept gives the codes of the dense suite run."""
    from dictionary_learning.scae import all_connections, pruned_forward, run_suite

    from ..helpers import make_suite

    model = load_model(name, attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    record, _ = run_suite(suite, model, random_texts(3, seed=22, max_words=8), ctx_len=CTX,
                          logits=False)
    codes = pruned_forward(suite, model, record, all_connections(suite, model))
    for module in suite.names:
        torch.testing.assert_close(codes[module][record.mask], record.codes[module][record.mask],
                                   atol=1e-4, rtol=1e-4,
                                   msg=lambda m, module=module: f"{name} {module}: {m}")


@pytest.mark.parametrize("name", [name for name in NAMES if name not in NOT_DECOMPOSED])
def test_run_suite_logits_equal_a_plain_hook_patched_run(name):
    """run_suite's logits equal a plain PyTorch run whose forward hooks replace each layer's
    attn_out and mlp_out sites by the suite's reconstructions (the transcoder reading the mlp_in
    site), each text run alone."""
    from dictionary_learning.scae import run_suite

    from ..helpers import make_suite

    model = load_model(name, attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    texts = random_texts(3, seed=23, max_words=8)
    record, logits = run_suite(suite, model, texts, ctx_len=CTX)
    adapter, hf = get_adapter(model), torch_model(model)
    first = lambda value: value[0] if isinstance(value, tuple) else value  # noqa: E731
    handles, mlp_inputs = [], {}
    for layer in range(suite.n_layers):
        sae, transcoder = suite[f"attn_{layer}"], suite[f"mlp_{layer}"]
        attn_path, _ = adapter.site_path(layer, "attn_out")
        in_path, in_io = adapter.site_path(layer, "mlp_in")
        out_path, _ = adapter.site_path(layer, "mlp_out")

        def replace(module, args, out, sae=sae):
            return (sae(out[0]), *out[1:]) if isinstance(out, tuple) else sae(out)

        def remember(module, args, out=None, layer=layer, in_io=in_io):
            mlp_inputs[layer] = first(args) if in_io == "input" else first(out)

        def transcode(module, args, out, layer=layer, transcoder=transcoder):
            return transcoder(mlp_inputs[layer])

        handles.append(hf.get_submodule(attn_path).register_forward_hook(replace))
        if in_io == "input":
            handles.append(hf.get_submodule(in_path).register_forward_pre_hook(remember))
        else:
            handles.append(hf.get_submodule(in_path).register_forward_hook(remember))
        handles.append(hf.get_submodule(out_path).register_forward_hook(transcode))
    try:
        with torch.no_grad():
            for row, text in enumerate(texts):
                ids = model.tokenizer(text, return_tensors="pt", truncation=True,
                                      max_length=CTX)["input_ids"]
                expected = hf(ids).logits[0]
                torch.testing.assert_close(logits[row][record.mask[row]], expected, atol=1e-4,
                                           rtol=1e-4,
                                           msg=lambda m, row=row: f"{name} text {row}: {m}")
    finally:
        for handle in handles:
            handle.remove()

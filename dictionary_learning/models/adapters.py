"""Family adapters: everything that differs between model families, and nothing else.

A `FamilyAdapter` names a family's module paths (blocks, attention, MLP, norms, embedding);
`norm_params` and `attention_ov` read a layer's norm (with its formula: `NormParams`) and per-head
OV weights. No other room of the package branches on a family, a config name or a norm type.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

SITES = ("resid", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class FamilyAdapter:
    """Module paths (relative to the Hugging Face model) of one model family."""

    family: str
    layers: str  # the ModuleList of decoder blocks
    attn: str  # attention module, relative to a block
    attn_norm: str  # norm before attention, relative to a block
    mlp_norm: str  # norm before the MLP, relative to a block
    embed: str  # token embedding
    final_norm: str
    mlp: str = "mlp"  # MLP module, relative to a block
    unembed: str = "lm_head"
    # value / output weights: "llama" (v_proj, o_proj), "gpt2", "fused_qkv", "gpt_neox"
    attention_layout: str = "llama"
    # module whose output attention adds to the residual, if not `attn` (a post-norm)
    attn_out: str | None = None
    # module whose output the MLP adds to the residual, if not `mlp` (a post-norm)
    mlp_out: str | None = None
    # RMSNorms multiply by (offset + weight): Gemma stores w and scales by 1 + w
    norm_weight_offset: float = 0.0
    # norms with no weight or bias: LayerNorm with this eps (OLMo)
    parameterless_norm_eps: float | None = None
    # why the SCAE linearisation of a block cannot be built for this family
    not_decomposable: str | None = None
    # config key that, when true, makes the MLP read the block input too
    parallel_residual_flag: str | None = None

    def block(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def site_path(self, layer: int, site: str) -> tuple[str, str]:
        """(module path, "input" | "output") of a named site at a layer."""
        block = self.block(layer)
        return {
            "resid": (block, "output"),
            "attn_out": (f"{block}.{self.attn_out or self.attn}", "output"),
            "mlp_in": (f"{block}.{self.mlp}", "input"),
            "mlp_out": (f"{block}.{self.mlp_out or self.mlp}", "output"),
        }[site]


LLAMA = FamilyAdapter("llama", layers="model.layers", attn="self_attn", attn_norm="input_layernorm",
                      mlp_norm="post_attention_layernorm", embed="model.embed_tokens",
                      final_norm="model.norm")
GPT2 = FamilyAdapter("gpt2", layers="transformer.h", attn="attn", attn_norm="ln_1", mlp_norm="ln_2",
                     embed="transformer.wte", final_norm="transformer.ln_f",
                     attention_layout="gpt2")
# GPT-NeoX (Pythia): the unembedding is lm_head from transformers 5 on (4.x called it embed_out).
GPT_NEOX = FamilyAdapter(
    "gpt_neox", layers="gpt_neox.layers", attn="attention", attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm", embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    # query_key_value packs q | k | v per head; dense is the output projection
    attention_layout="gpt_neox",
    # Pythia: attention and MLP both read the block input
    parallel_residual_flag="use_parallel_residual",
)
# The families below have Llama's module paths. Gemma: RMSNorm scales by (1 + w); the embedding's
# sqrt(d_model) factor is inside embed_tokens' forward.
GEMMA = replace(LLAMA, family="gemma", norm_weight_offset=1.0)
# Gemma 2: attention's and the MLP's outputs pass through post-norms before they reach the residual
# stream, and the MLP reads pre_feedforward_layernorm (post_attention_layernorm is attention's
# post-norm there).
GEMMA2 = replace(
    LLAMA, family="gemma2", mlp_norm="pre_feedforward_layernorm",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm", norm_weight_offset=1.0,
    not_decomposable="its post-attention and post-feedforward RMSNorms rescale what attention and "
    "the MLP add to the residual stream, which the linearisation does not route through",
)
# Phi-3: q | k | v fused in self_attn.qkv_proj (and gate | up in mlp.gate_up_proj).
PHI3 = replace(LLAMA, family="phi3", attention_layout="fused_qkv")
# OLMo: LayerNorms without weight or bias (eps fixed at 1e-5 in OlmoLayerNorm's forward).
OLMO = replace(LLAMA, family="olmo", parameterless_norm_eps=1e-5)

# config.model_type -> adapter; Llama-like decoders share Llama's module names.
ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "phi3": PHI3,
    "olmo": OLMO,
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
}
# families refused on purpose: config.model_type -> what is missing
REFUSED: dict[str, str] = {
    name: "a mixture-of-experts MLP (no single MLP module whose input and output are the hook "
          "points)"
    for name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "jetmoe",
                 "deepseek_v3")
}


def torch_model(model: Any) -> nn.Module:
    """The plain torch module behind an nnsight model (or the module itself)."""
    return getattr(model, "_module", model)


def get_adapter(model: Any) -> FamilyAdapter:
    """The family adapter for a model (nnsight-wrapped or plain Hugging Face)."""
    model_type = getattr(torch_model(model).config, "model_type", None)
    if model_type in REFUSED:
        raise ValueError(
            f"model family {model_type!r} is not supported: it has {REFUSED[model_type]}; "
            f"supported families: {sorted(ADAPTERS)}"
        )
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no adapter for model family {model_type!r} (config.model_type); known families: "
            f"{sorted(ADAPTERS)}. Use plain dotted module paths, or add a FamilyAdapter in "
            "dictionary_learning/models/adapters.py."
        )
    return ADAPTERS[model_type]


def n_layers(model: Any) -> int:
    config = torch_model(model).config
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def d_model(model: Any) -> int:
    """The width of the residual stream."""
    config = torch_model(model).config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def model_fingerprint(model: Any) -> str | None:
    """A short hash of what makes a model this model: its family, depth, width and vocabulary, and a
    sample of its token embedding's values (rounded to bfloat16, so the same weights loaded in
    float32 or bfloat16 agree). Saved with caches and suites, so that using them with another model
    of the same shape is refused. None where the weights are not on this machine (a model loaded for
    remote execution)."""
    import hashlib

    module = torch_model(model)
    config = getattr(module, "config", None)
    try:
        weight = module.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return None
    if weight.device.type == "meta":
        return None
    rows = weight.detach()[:: max(1, weight.shape[0] // 64), :64]
    sample = rows.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
    shape = (f"{getattr(config, 'model_type', '')}:{n_layers(model)}:"
             f"{d_model(model)}:{weight.shape[0]}")
    return hashlib.sha256(shape.encode() + sample).hexdigest()[:16]


def max_context(model: Any) -> int | None:
    """Longest context the model accepts (None if the config does not say)."""
    config = torch_model(model).config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None


def module_paths(model: Any) -> list[str]:
    """Every dotted module path of the model, in registration order."""
    return [name for name, _ in torch_model(model).named_modules() if name]


def get_module(model: Any, path: str) -> nn.Module:
    """The torch module at a dotted path; an unknown path raises ValueError listing close valid
    ones."""
    try:
        return torch_model(model).get_submodule(path)
    except AttributeError:
        valid = module_paths(model)
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        near = [p for p in valid if p.startswith(parent)] if parent else []
        shown = (near or valid)[:40]
        raise ValueError(
            f"no module {path!r} in {type(torch_model(model)).__name__}; valid paths include: "
            f"{shown}"
            + (f" ... ({len(valid)} in all, see dictionary_learning.models.module_paths(model))"
               if len(valid) > 40 else "")
        ) from None


# --------------------------------------------------------------------------------------------------
# norms and attention weights, as the linearisation of a block needs them


@dataclass(frozen=True)
class NormParams:
    """A pre-norm: y = linear_part(x) * scale(x) + bias, where linear_part(x) = weight * C x, C
    centres (LayerNorm) or is the identity (RMSNorm), and scale(x) = 1 / sqrt(mean((C x)^2) + eps)
    is one number per token."""

    kind: str  # "rms" | "layer"
    weight: torch.Tensor  # [d_model]
    bias: torch.Tensor | None  # [d_model]
    eps: float

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """C x: the mean over the last dimension removed for LayerNorm, x itself for RMSNorm."""
        return x - x.mean(dim=-1, keepdim=True) if self.kind == "layer" else x

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """s(x) = 1 / sqrt(mean((C x)^2) + eps): `[..., d] -> [...]`."""
        return torch.rsqrt(self.centre(x).pow(2).mean(dim=-1) + self.eps)

    def linear_part(self, x: torch.Tensor) -> torch.Tensor:
        """weight * C x: the norm without its per-token scale and bias (linear in x)."""
        return self.centre(x) * self.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_part(x) * self.scale(x)[..., None]
        return y + self.bias if self.bias is not None else y


@dataclass(frozen=True)
class AttentionOV:
    """Per-head value and output maps, grouped-query heads expanded: head h's contribution at query
    q is `sum_k P[h, q, k] * (x_normed[k] @ W_V[h] + b_V[h]) @ W_O[h]`; the module adds `b_O`
    once."""

    W_V: torch.Tensor  # [n_heads, d_model, d_head]
    b_V: torch.Tensor | None  # [n_heads, d_head]
    W_O: torch.Tensor  # [n_heads, d_head, d_model]
    b_O: torch.Tensor | None  # [d_model]

    @property
    def n_heads(self) -> int:
        return self.W_V.shape[0]


def norm_params(model: Any, layer: int | None, which: str) -> NormParams:
    """The parameters of a layer's "attn" or "mlp" pre-norm, or of the "final" norm (layer None)."""
    adapter = get_adapter(model)
    if which == "final":
        path = adapter.final_norm
    elif which in ("attn", "mlp"):
        _require_decomposable(adapter)
        path = (f"{adapter.block(layer)}."
                f"{adapter.attn_norm if which == 'attn' else adapter.mlp_norm}")
    else:
        raise ValueError(f"which must be 'attn', 'mlp' or 'final', got {which!r}")
    module = get_module(model, path)
    if isinstance(module, nn.LayerNorm):
        return NormParams("layer", module.weight, module.bias, module.eps)
    if adapter.parameterless_norm_eps is not None and getattr(module, "weight", None) is None:
        ones = torch.ones(d_model(model), device=_device(model), dtype=_dtype(model))
        return NormParams("layer", ones, None, adapter.parameterless_norm_eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None or not hasattr(module, "weight"):
        raise ValueError(f"{path} ({type(module).__name__}) is neither a LayerNorm nor an RMSNorm "
                         "with weight and eps")
    weight = (module.weight + adapter.norm_weight_offset if adapter.norm_weight_offset
              else module.weight)
    return NormParams("rms", weight, getattr(module, "bias", None), float(eps))


def parallel_residual(model: Any) -> bool:
    """Whether a block's MLP reads the block input (through its own norm) rather than the residual
    stream after attention, so that a layer's MLP is not downstream of the same layer's
    attention."""
    adapter = get_adapter(model)
    if adapter.parallel_residual_flag is None:
        return False
    return bool(getattr(torch_model(model).config, adapter.parallel_residual_flag, False))


def _device(model: Any) -> torch.device:
    return next(torch_model(model).parameters()).device


def _dtype(model: Any) -> torch.dtype:
    return next(torch_model(model).parameters()).dtype


def _require_decomposable(adapter: FamilyAdapter) -> None:
    if adapter.not_decomposable:
        raise ValueError(f"the SCAE linearisation does not support the {adapter.family} family: "
                         f"{adapter.not_decomposable}")


def attention_ov(model: Any, layer: int) -> AttentionOV:
    """A layer's per-head OV weights (views of the model's parameters, so gradients reach them)."""
    adapter = get_adapter(model)
    _require_decomposable(adapter)
    config = torch_model(model).config
    attn = get_module(model, f"{adapter.block(layer)}.{adapter.attn}")
    n_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    width = d_model(model)
    d_head = int(getattr(config, "head_dim", None) or width // n_heads)
    if adapter.attention_layout in ("llama", "fused_qkv"):
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        if adapter.attention_layout == "llama":
            v_weight, v_bias = attn.v_proj.weight, attn.v_proj.bias
        else:  # qkv_proj's rows: n_heads query heads, then n_kv key heads, then n_kv value heads
            start = (n_heads + n_kv) * d_head
            v_weight = attn.qkv_proj.weight[start:]
            v_bias = attn.qkv_proj.bias[start:] if attn.qkv_proj.bias is not None else None
        W_V = v_weight.view(n_kv, d_head, width).transpose(1, 2)  # [n_kv, d_model, d_head]
        b_V = v_bias.view(n_kv, d_head) if v_bias is not None else None
        repeat = n_heads // n_kv  # query head h reads kv head h // repeat
        W_V = W_V.repeat_interleave(repeat, dim=0)
        b_V = b_V.repeat_interleave(repeat, dim=0) if b_V is not None else None
        # [n_heads, d_head, d_model]
        W_O = attn.o_proj.weight.view(width, n_heads, d_head).permute(1, 2, 0)
        b_O = attn.o_proj.bias
    # Conv1D: y = x @ weight + bias, c_attn packs q | k | v
    elif adapter.attention_layout == "gpt2":
        W_V = attn.c_attn.weight[:, 2 * width :].view(width, n_heads, d_head).transpose(0, 1)
        b_V = attn.c_attn.bias[2 * width :].view(n_heads, d_head)
        W_O = attn.c_proj.weight.view(n_heads, d_head, width)
        b_O = attn.c_proj.bias
    # query_key_value's rows: per head, its q, k and v (d_head each)
    elif adapter.attention_layout == "gpt_neox":
        qkv = attn.query_key_value
        # [n_heads, d_model, d_head]
        W_V = qkv.weight.view(n_heads, 3, d_head, width)[:, 2].transpose(1, 2)
        b_V = qkv.bias.view(n_heads, 3, d_head)[:, 2] if qkv.bias is not None else None
        # [n_heads, d_head, d_model]
        W_O = attn.dense.weight.view(width, n_heads, d_head).permute(1, 2, 0)
        b_O = attn.dense.bias
    else:
        raise ValueError(f"attention_ov does not know the {adapter.family} layout yet")
    return AttentionOV(W_V, b_V, W_O, b_O)

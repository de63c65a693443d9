"""Family adapters: everything that differs between model families, and nothing else.

A `FamilyAdapter` names a family's module paths (blocks, attention, MLP, norms, embedding); `norm_params` and
`attention_ov` read a layer's norm (with its formula: `NormParams`) and per-head OV weights. No other room of the
package branches on a family, a config name or a norm type.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    mlp: str  # MLP module, relative to a block
    attn_norm: str  # norm before attention, relative to a block
    mlp_norm: str  # norm before the MLP, relative to a block
    embed: str  # token embedding
    final_norm: str
    unembed: str
    attention_layout: str = "llama"  # how value / output weights are stored: "llama" (v_proj, o_proj) or "gpt2"

    def block(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def site_path(self, layer: int, site: str) -> tuple[str, str]:
        """(module path, "input" | "output") of a named site at a layer."""
        block = self.block(layer)
        return {
            "resid": (block, "output"),
            "attn_out": (f"{block}.{self.attn}", "output"),
            "mlp_in": (f"{block}.{self.mlp}", "input"),
            "mlp_out": (f"{block}.{self.mlp}", "output"),
        }[site]


LLAMA = FamilyAdapter(
    family="llama",
    layers="model.layers",
    attn="self_attn",
    mlp="mlp",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
)
GPT2 = FamilyAdapter(
    family="gpt2",
    layers="transformer.h",
    attn="attn",
    mlp="mlp",
    attn_norm="ln_1",
    mlp_norm="ln_2",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    attention_layout="gpt2",
)
GPT_NEOX = FamilyAdapter(
    family="gpt_neox",
    layers="gpt_neox.layers",
    attn="attention",
    mlp="mlp",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",  # transformers 5 (4.x called it embed_out)
    attention_layout="gpt_neox",
)
# config.model_type -> adapter; Llama-like decoders share Llama's module names.
ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "gemma2": LLAMA,
    "olmo": LLAMA,
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
}


def torch_model(model: Any) -> nn.Module:
    """The plain torch module behind an nnsight model (or the module itself)."""
    return getattr(model, "_module", model)


def get_adapter(model: Any) -> FamilyAdapter:
    """The family adapter for a model (nnsight-wrapped or plain Hugging Face)."""
    model_type = getattr(torch_model(model).config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no adapter for model_type {model_type!r}; known families: {sorted(ADAPTERS)}. "
            "Use plain dotted module paths, or add a FamilyAdapter in dictionary_learning/models/adapters.py."
        )
    return ADAPTERS[model_type]


def n_layers(model: Any) -> int:
    config = torch_model(model).config
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def d_model(model: Any) -> int:
    """The width of the residual stream."""
    config = torch_model(model).config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


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
    """The torch module at a dotted path; an unknown path raises ValueError listing close valid ones."""
    try:
        return torch_model(model).get_submodule(path)
    except AttributeError:
        valid = module_paths(model)
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        near = [p for p in valid if p.startswith(parent)] if parent else []
        shown = (near or valid)[:40]
        raise ValueError(
            f"no module {path!r} in {type(torch_model(model)).__name__}; valid paths include: {shown}"
            + (f" ... ({len(valid)} in all, see dictionary_learning.models.module_paths(model))" if len(valid) > 40 else "")
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# norms and attention weights, as the linearisation of a block needs them


@dataclass(frozen=True)
class NormParams:
    """A pre-norm: y = linear_part(x) * scale(x) + bias, where linear_part(x) = weight * C x, C centres (LayerNorm)
    or is the identity (RMSNorm), and scale(x) = 1 / sqrt(mean((C x)^2) + eps) is one number per token."""

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
    """Per-head value and output maps, grouped-query heads expanded: head h's contribution at query q is
    `sum_k P[h, q, k] * (x_normed[k] @ W_V[h] + b_V[h]) @ W_O[h]`; the module adds `b_O` once."""

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
        path = f"{adapter.block(layer)}.{adapter.attn_norm if which == 'attn' else adapter.mlp_norm}"
    else:
        raise ValueError(f"which must be 'attn', 'mlp' or 'final', got {which!r}")
    module = get_module(model, path)
    if isinstance(module, nn.LayerNorm):
        return NormParams("layer", module.weight, module.bias, module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None or not hasattr(module, "weight"):
        raise ValueError(f"{path} ({type(module).__name__}) is neither a LayerNorm nor an RMSNorm with weight and eps")
    return NormParams("rms", module.weight, getattr(module, "bias", None), float(eps))


def attention_ov(model: Any, layer: int) -> AttentionOV:
    """A layer's per-head OV weights (views of the model's parameters, so gradients reach them)."""
    adapter = get_adapter(model)
    config = torch_model(model).config
    attn = get_module(model, f"{adapter.block(layer)}.{adapter.attn}")
    n_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    width = d_model(model)
    d_head = int(getattr(config, "head_dim", None) or width // n_heads)
    if adapter.attention_layout == "llama":
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        W_V = attn.v_proj.weight.view(n_kv, d_head, width).transpose(1, 2)  # [n_kv, d_model, d_head]
        b_V = attn.v_proj.bias.view(n_kv, d_head) if attn.v_proj.bias is not None else None
        repeat = n_heads // n_kv  # query head h reads kv head h // repeat
        W_V = W_V.repeat_interleave(repeat, dim=0)
        b_V = b_V.repeat_interleave(repeat, dim=0) if b_V is not None else None
        W_O = attn.o_proj.weight.view(width, n_heads, d_head).permute(1, 2, 0)  # [n_heads, d_head, d_model]
        b_O = attn.o_proj.bias
    elif adapter.attention_layout == "gpt2":  # Conv1D: y = x @ weight + bias, c_attn packs q | k | v
        W_V = attn.c_attn.weight[:, 2 * width :].view(width, n_heads, d_head).transpose(0, 1)
        b_V = attn.c_attn.bias[2 * width :].view(n_heads, d_head)
        W_O = attn.c_proj.weight.view(n_heads, d_head, width)
        b_O = attn.c_proj.bias
    else:
        raise ValueError(f"attention_ov does not know the {adapter.family} layout yet")
    return AttentionOV(W_V, b_V, W_O, b_O)

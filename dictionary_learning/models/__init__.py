"""Language models for dictionary learning: loading (`loading.py`), per-family adapters
(`adapters.py`) and named hook points (`hooks.py`). Family knowledge (module paths of layers,
attention, MLP and norms, the norms' formulas, attention weight layouts) lives in `adapters.py`
only. Every name stays importable from `dictionary_learning.models`.
"""

from ..files import cache_dir
from .adapters import (
    ADAPTERS,
    GPT2,
    GPT_NEOX,
    LLAMA,
    SITES,
    AttentionOV,
    FamilyAdapter,
    NormParams,
    attention_ov,
    d_model,
    get_adapter,
    get_module,
    max_context,
    model_fingerprint,
    module_paths,
    n_layers,
    norm_params,
    parallel_residual,
    torch_model,
)
from .hooks import (
    BUFFER_IO,
    UPSTREAM_IO,
    HookPoint,
    buffer_io,
    execution_key,
    execution_order,
    hook,
    hook_io,
    resolve_hook,
    submodule_points,
)
from .loading import (
    DEFAULT_MODEL,
    DTYPES,
    SMOLLM2_GGUF,
    SMOLLM2_WHEEL,
    TINY_VOCAB,
    byte_tokenizer,
    default_dtype,
    dtype_from_name,
    load_model,
    smollm2_path,
    tiny_hf_model,
)

__all__ = [
    "ADAPTERS", "BUFFER_IO", "DEFAULT_MODEL", "DTYPES", "GPT2", "GPT_NEOX", "LLAMA", "SITES",
    "SMOLLM2_GGUF", "SMOLLM2_WHEEL", "TINY_VOCAB", "UPSTREAM_IO", "AttentionOV", "FamilyAdapter",
    "HookPoint", "NormParams", "attention_ov", "buffer_io", "byte_tokenizer", "cache_dir",
    "d_model", "default_dtype", "dtype_from_name", "execution_key", "execution_order",
    "get_adapter", "get_module", "hook", "hook_io", "load_model", "max_context",
    "model_fingerprint", "module_paths", "n_layers", "norm_params", "parallel_residual",
    "resolve_hook", "smollm2_path", "submodule_points", "tiny_hf_model", "torch_model",
]

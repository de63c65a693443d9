"""The options of the pipelines, one dataclass each (the command line's flags are their fields):
`QuickstartConfig` and `CollectConfig`, on `ReadingConfig` (the model, hook point and text both read
activations from)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checks import integer
from ..models import DEFAULT_MODEL


@dataclass
class ReadingConfig:
    """Which model, hook point and text a pipeline reads activations from, and how."""

    model: str = DEFAULT_MODEL
    """smollm2-135m (default, offline), tiny-llama, tiny-gpt2, a local directory or a hub id"""
    layer: int | None = None
    """the layer read (None: the middle one)"""
    site: str = "resid"
    """the site read at that layer: resid, attn_out, mlp_in or mlp_out (models.SITES)"""
    data: str | None = None
    """the text: python-docs (None, offline), a .txt / .jsonl file or folder, or a hub dataset
    id[:split]"""
    dtype: str = "auto"
    """the model's and activations' dtype ("auto": bfloat16 where the hardware is fast at it, else
    float32)"""
    device: str = "cpu"
    """where the model (and the SAE) run"""
    ctx_len: int | None = 128
    """tokens per context"""
    remove_bos: bool = True
    """drop each context's first token (BOS or attention sink)"""
    max_activation_norm_multiple: float | None = 10.0
    """drop from the training activations the tokens whose norm exceeds this multiple of the median
    norm of their batch (massive-activation tokens; None: keep every token). Held-out metrics see
    every token."""
    progress: bool = True
    """a line on stderr as each phase starts, bars over the long ones (False: quiet)"""


@dataclass
class QuickstartConfig(ReadingConfig):
    """The options of `quickstart`: a TopK SAE trained, evaluated and reported on."""

    ctx_len: int | None = None
    """tokens per context (None: 128, or with `cache` the cache's own; another than the cache's is
    refused)"""
    tokens: int = 150_000
    """training activations to collect (once; with `cache`: none, the cache's are read)"""
    steps: int = 600
    """training steps (epochs over the collected tokens)"""
    batch: int = 2048
    """activations per training step"""
    d_sae: int = 4608
    """the SAE's features (the command line's --dict-size, or --d-sae)"""
    k: int = 32
    """active features per token"""
    lr: float = 1e-3
    """learning rate"""
    dead_tokens: int = 200_000
    """tokens without firing before a feature counts as dead for AuxK"""
    batch_texts: int = 32
    """texts per forward pass"""
    eval_texts: int = 150
    """held-out texts (the first of the text source, never trained on)"""
    eval_tokens: int = 8192
    """held-out tokens the metrics are measured on"""
    loss_batches: int = 2
    """batches of 16 held-out texts for loss_recovered"""
    n_features: int = 8
    """features shown in top_contexts.txt"""
    seed: int = 0
    """seeds the buffer's shuffle, the SAE's initialisation and the features shown"""
    wandb: bool = False
    """log training to wandb ($WANDB_MODE, default offline)"""
    out: str | Path = "reports/quickstart"
    """the report folder"""
    cache: str | Path | None = None
    """train on this activation cache folder (`collect --out DIR`, the same model, holding the layer
    / site asked for) instead of collecting `tokens`; the held-out texts then follow those the cache
    read"""
    encoder_dtype: str = "auto"
    """the SAE's dense encoder GEMM while training ("auto": bfloat16 where the hardware is fast at
    it; weights and Adam stay float32)"""
    dashboard_features: int = 300
    """features in the report's dashboard (the first N; 0: no dashboard)"""
    dashboard_tokens: int = 8192
    """held-out tokens the dashboard reads"""

    def __post_init__(self) -> None:  # before any model is loaded or token collected
        for name in ("tokens", "steps", "batch", "d_sae", "dead_tokens", "batch_texts",
                     "eval_texts", "eval_tokens", "loss_batches"):
            integer(name, getattr(self, name))
        integer("n_features", self.n_features, low=0)
        integer("dashboard_features", self.dashboard_features, low=0)
        integer("dashboard_tokens", self.dashboard_tokens)
        integer("k", self.k, 1, self.d_sae, high_name="d_sae")
        if self.batch > self.tokens and self.cache is None:
            raise ValueError(f"batch={self.batch} exceeds tokens={self.tokens}: a training step "
                             f"needs batch activations of the {self.tokens} collected")


@dataclass
class CollectConfig(ReadingConfig):
    """The options of `collect`: activations read at hook points, their statistics, and where they
    are saved."""

    tokens: int = 20000
    """token vectors to collect (with a cache folder `out`: the cache's tokens in all)"""
    batch: int = 32
    """texts per forward pass"""
    out: str | Path | None = None
    """FILE.safetensors: save the activations in one file; another path: a cache folder
    (see `cache.write_cache`)"""
    layers: str | list[int] | None = None
    """layers to read instead of `layer` (a list, or comma-separated "0,1,2"), each at every site,
    in one pass"""
    sites: str | list[str] | None = None
    """sites to read instead of `site` (a list, or comma-separated "resid,mlp_out")"""
    shard_tokens: int = 65536
    """rows per shard of a cache folder"""

    def __post_init__(self) -> None:  # before the model is loaded
        for name in ("tokens", "ctx_len", "batch", "shard_tokens"):
            integer(name, getattr(self, name))

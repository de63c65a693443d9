"""`collect`: activations at hook points, their statistics, optionally saved as safetensors or a
disk cache."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..buffer import ActivationBuffer
from ..cache import ActivationCache, read_manifest, write_cache
from ..checks import check_memory
from ..checks import options as check_options
from ..data import text_source
from ..evaluation import activation_statistics
from ..files import atomic_write, check_writable_folder
from ..models import d_model, dtype_from_name, hook, load_model, n_layers
from ..progress import phase
from .configs import CollectConfig


def _layers_and_sites(lm: Any, config: CollectConfig) -> dict[str, Any]:
    """The hook points `collect` reads, by name ("layers.1.mlp_out"): every layer of `layers` (else
    `layer`, else the middle one) at every site of `sites` (else `site`)."""
    layer, site, layers, sites = config.layer, config.site, config.layers, config.sites
    if layers is not None and layer is not None:
        raise ValueError(f"give layer={layer} or layers={layers!r}, not both")
    if isinstance(layers, str):
        try:
            layers = [int(part) for part in layers.split(",")]
        except ValueError:
            raise ValueError("--layers must be comma-separated integers such as 0,1,2, got "
                             f"{layers!r}") from None
    if isinstance(sites, str):
        sites = [part.strip() for part in sites.split(",")]
    layers = layers if layers is not None else [n_layers(lm) // 2 if layer is None else layer]
    points = {}
    for number in layers:
        for name in sites or [site]:
            point = hook(lm, number, name)
            points[str(point)] = point
    return points


def collect(config: CollectConfig | None = None, **options: Any) -> dict[str, Any]:
    """Read `tokens` activation vectors at a hook point (default: the middle layer's residual
    stream), or at every layer of `layers` times every site of `sites` from one model pass, and
    print their statistics as JSON. `out` ending in .safetensors: save them there as one file (with
    the buffer's config; one tensor per hook point, named like "layers.1.mlp_out", when there are
    several). Another `out` is a cache folder: the activations are written there as shards of
    `shard_tokens` rows (see `cache.write_cache`; `tokens` counts all of the cache's tokens, and
    running the same command again continues an interrupted or shorter collection); statistics are
    then of a shuffled sample of up to 20000 of them. `options`: the fields of `CollectConfig` (or
    pass one as `config`; options given as well replace its fields).
    `progress`: a line on stderr as each phase starts, bars over the long ones (False: quiet)."""
    from safetensors.torch import save_file

    config = check_options(CollectConfig, config, options, "collect")
    to_cache = config.out is not None and not str(config.out).endswith(".safetensors")
    if config.out is not None and not to_cache and Path(config.out).is_dir():
        raise ValueError("out must be a .safetensors file path, got the folder "
                         f"{str(config.out)!r}")
    if to_cache:
        check_writable_folder("out", config.out)
    torch_dtype = dtype_from_name(config.dtype, config.device)
    start = time.perf_counter()
    with phase(f"loading {config.model} ...", config.progress):
        lm = load_model(config.model, device=config.device, dtype=torch_dtype)
    points = _layers_and_sites(lm, config)
    if not to_cache:  # held in memory, one row per token at every hook point
        check_memory("tokens", config.tokens,
                     config.tokens * d_model(lm) * len(points) * torch_dtype.itemsize,
                     what=f" to hold {len(points)} hook point(s) in {str(torch_dtype)[6:]}")
    submodule = next(iter(points.values())) if len(points) == 1 else points
    if config.progress:
        print(f"model {config.model} loaded in {time.perf_counter() - start:.1f} s; reading "
              f"{', '.join(points)} ({str(torch_dtype)[6:]})", file=sys.stderr)
    start = time.perf_counter()
    if to_cache:
        before = (read_manifest(config.out)["n_tokens"]
                  if (Path(config.out) / "manifest.json").exists() else 0)
        with phase(f"writing up to {config.tokens:,} tokens to the cache {config.out} ...",
                   config.progress):
            write_cache(lm, text_source(config.data), submodule, config.out, config.tokens,
                        ctx_len=config.ctx_len, batch_texts=config.batch,
                        shard_tokens=config.shard_tokens, remove_bos=config.remove_bos,
                        max_activation_norm_multiple=config.max_activation_norm_multiple,
                        dtype=torch_dtype, model_name=config.model,
                        source=config.data or "python-docs", progress=config.progress)
        seconds = time.perf_counter() - start
        cache = ActivationCache(config.out, min(20000, read_manifest(config.out)["n_tokens"]),
                                seed=0)
        sample, added = next(cache), cache.n_tokens - before
        stats = {"model": config.model, "hooks": list(points), "out": str(config.out),
                 "cache_tokens": cache.n_tokens, "shards": len(cache.shards), "tokens_added": added,
                 "tokens_per_second": added / seconds,
                 "filtered": read_manifest(config.out).get("filtered")}
    else:
        n_ctxs = max(1, config.tokens // config.ctx_len)
        buffer = ActivationBuffer(text_source(config.data), lm, submodule, n_ctxs=n_ctxs,
                                  ctx_len=config.ctx_len, refresh_batch_size=config.batch,
                                  out_batch_size=min(4096, n_ctxs * config.ctx_len),
                                  device=config.device, dtype=torch_dtype,
                                  remove_bos=config.remove_bos, progress=config.progress,
                                  max_activation_norm_multiple=config.max_activation_norm_multiple)
        with phase(f"collecting {config.tokens:,} tokens ...", config.progress):
            sample = buffer.take(config.tokens, progress=config.progress)
        seconds = time.perf_counter() - start
        rows = next(iter(sample.values())) if isinstance(sample, dict) else sample
        stats = {"model": config.model, "hook": ", ".join(points),
                 "tokens_per_second": rows.shape[0] / seconds,
                 "filtered": buffer.filtered.summary()}
    rows = next(iter(sample.values())) if isinstance(sample, dict) else sample
    with phase(f"statistics of {rows.shape[0]:,} activation vectors ...", config.progress):
        if isinstance(sample, dict):
            stats["statistics"] = {name: activation_statistics(value)
                                   for name, value in sample.items()}
        else:
            stats.update(activation_statistics(sample))
    print(json.dumps(stats, indent=2))
    if config.out and not to_cache:
        metadata = {"buffer_config": json.dumps(buffer.config), "model": config.model}
        tensors = ({name: value.contiguous() for name, value in sample.items()}
                   if isinstance(sample, dict)
                   else {"activations": sample.contiguous()})
        atomic_write(config.out, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        print(f"saved {tuple(rows.shape)} per hook point to {config.out}", file=sys.stderr)
    elif to_cache:
        print(f"cache {config.out}: {stats['cache_tokens']} tokens in {stats['shards']} shards",
              file=sys.stderr)
    return stats


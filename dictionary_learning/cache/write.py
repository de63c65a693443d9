"""Writing a cache: `write_cache` (activations read out of a model, resumable) and
`cache_from_tensors`."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import save_file

from ..buffer.points import PROBE_TEXT, check_collection, entry_points, entry_widths
from ..checks import check_disk, floating_dtype, integer, texts
from ..checks import options as check_options
from ..files import atomic_write, atomic_write_json, check_writable_folder, inside, writer_lock
from ..models import buffer_io, model_fingerprint, torch_model
from ..progress import progress_bar
from ..tracing import FilterCounts, TokenFilter, collect, tokenize
from .manifest import FORMAT, MANIFEST, hook_key, open_shard, resumable_manifest, shard_name


def _model_name(model: Any) -> str:
    config = getattr(torch_model(model), "config", None)
    return (getattr(config, "_name_or_path", "") or getattr(config, "model_type", "")
            or type(model).__name__)


def _written(out: Path) -> int:
    """Tokens a cache folder holds already (0 for a new one)."""
    try:
        return int(json.loads((out / MANIFEST).read_text())["n_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@dataclass
class CacheConfig:
    """How `write_cache` reads activations and lays out the cache: every field is recorded in the
    manifest and must match when a cache is continued (but `progress`)."""

    io: str = "out"
    """what is read at `submodule`: "out", "in", or "in_to_out" (an (input, output) pair), as
    ActivationBuffer's io"""
    ctx_len: int = 128
    """tokens per text (longer texts are truncated)"""
    batch_texts: int = 32
    """texts per forward pass"""
    shard_tokens: int = 65536
    """rows per shard file (the last may be partial)"""
    remove_bos: bool = False
    """leave each text's first token out (BOS or attention sink)"""
    add_special_tokens: bool = True
    """let the tokenizer add its special tokens (e.g. BOS)"""
    max_activation_norm_multiple: float | None = None
    """leave out tokens whose activation norm exceeds this multiple of the batch's median norm
    (None: keep all)"""
    dtype: torch.dtype | None = None
    """the dtype stored (None: the model's)"""
    progress: bool = True
    """a bar on stderr over the tokens once writing takes some seconds (`progress.DELAY`)"""
    model_name: str | None = None
    """recorded and checked on resume (default: the model config's name)"""
    source: str | None = None
    """a description of the texts (e.g. a dataset id), recorded and checked on resume"""

    def __post_init__(self) -> None:
        self.ctx_len, self.batch_texts, self.shard_tokens = (integer(name, getattr(self, name))
                                                             for name in (
            "ctx_len", "batch_texts", "shard_tokens"))
        floating_dtype("dtype", self.dtype)


def write_cache(model: Any, data: Iterable[str], submodule: Any, out: str | Path, n_tokens: int,
                config: CacheConfig | None = None, **options: Any) -> Path:
    """Read up to `n_tokens` activation vectors (in total, over all calls) at `submodule` (any form
    ActivationBuffer takes: a hook point, an (input, output) pair with io="in_to_out", or a dict of
    them by name) and append them to the cache folder `out` in shards of `shard_tokens` rows (the
    last may be partial). Stops at n_tokens or when `data` runs out. Called again on an existing
    cache with the same settings (and the same `data` from its start) it skips the texts already
    read and continues; different settings are refused. `model_name` and `source` (a description of
    the texts, e.g. a dataset id) are recorded and checked on resume (model_name defaults to the
    model config's name). Returns the folder. `options`: the fields of `CacheConfig` (or pass one as
    `config`; options given as well replace its fields). progress: a bar on stderr over the tokens
    once writing takes some seconds (`progress.DELAY`)."""
    config = check_options(CacheConfig, config, options, "write_cache")
    n_tokens = integer("n_tokens", n_tokens)
    out = Path(out)
    check_writable_folder("out", out)
    items = texts("data", data)
    with writer_lock(out, "activation cache"):
        return _append(model, items, submodule, out, n_tokens, config)


def _append(model: Any, items: Iterable[str], submodule: Any, out: Path, n_tokens: int,
            config: CacheConfig) -> Path:
    """write_cache's work, under the folder's writer lock."""
    check_collection(model, config.io, config.ctx_len, config.remove_bos,
                     config.max_activation_norm_multiple)
    hooks, entries = entry_points(model, submodule, config.io)
    token_filter = TokenFilter(config.remove_bos, config.max_activation_norm_multiple)
    counts = FilterCounts()  # what this call's filter dropped, in the manifest's "filtered"

    def keep(encoding: dict[str, torch.Tensor], values: Any) -> list[torch.Tensor]:
        return token_filter(encoding, values, counts)
    dtype = config.dtype or next(torch_model(model).parameters()).dtype

    def collect_rows(batch: list[str]) -> list[torch.Tensor]:
        """The kept rows of each hook point on these texts, on the CPU in the cache's dtype."""
        encoding = tokenize(model.tokenizer, batch, config.ctx_len, config.add_special_tokens)
        rows = collect(model, encoding, hooks, keep)
        return [side.to(device="cpu", dtype=dtype) for side in rows]

    widths = tuple(rows.shape[-1] for rows in collect_rows([PROBE_TEXT]))
    counts = FilterCounts()  # the probe is not data (keep reads the new one)
    settings = {
        "model": config.model_name or _model_name(model), "source": config.source, "io": config.io,
        "hooks": [{"path": h.path, "io": h.io, "name": h.name} for h in hooks],
        "entries": None if entries is None else {k: list(v) for k, v in entries.items()},
        "widths": list(widths),
        "dtype": str(dtype).removeprefix("torch."), "ctx_len": config.ctx_len,
        "remove_bos": config.remove_bos, "add_special_tokens": config.add_special_tokens,
        "max_activation_norm_multiple": config.max_activation_norm_multiple,
        "batch_texts": config.batch_texts, "shard_tokens": config.shard_tokens,
        "model_fingerprint": model_fingerprint(model),
    }
    check_disk(out, (n_tokens - _written(out)) * sum(widths) * dtype.itemsize, "n_tokens")
    manifest = resumable_manifest(out, settings)
    manifest["d_submodule"] = entry_widths(widths, entries)
    shards = manifest["shards"]
    # pending rows, as segments [resume point of their first row (data items, rows into that text
    # batch), tensors, resume point after them]; a reopened partial last shard comes first
    segments: list[list[Any]] = []
    resume_point = (manifest["position"], manifest["position_rows"])
    written = sum(shard["tokens"] for shard in shards)
    if shards and shards[-1]["tokens"] < config.shard_tokens and written < n_tokens:
        last = shards.pop()
        with open_shard(inside(out, last["file"], "a shard file")) as file:
            rows = [file.get_slice(hook_key(i))[: last["tokens"]] for i in range(len(hooks))]
        segments.append([resume_point, rows, resume_point])
        written -= last["tokens"]

    def pending() -> int:
        return sum(segment[1][0].shape[0] for segment in segments)

    def write_shard(n: int) -> None:
        """Cut the first n pending rows into the next shard and record it (and the new resume
        point)."""
        nonlocal written
        parts, left = [], n
        while left:
            first, rows, after = segments[0]
            take = min(left, rows[0].shape[0])
            parts.append([r[:take] for r in rows])
            left -= take
            if take == rows[0].shape[0]:
                segments.pop(0)
            else:
                segments[0] = [(first[0], first[1] + take), [r[take:] for r in rows], after]
        shards.append(_save_shard(out, len(shards), [torch.cat(side) for side in zip(*parts)]))
        written += n
        manifest["position"], manifest["position_rows"] = (segments[0][0] if segments
                                                           else resume_point)
        manifest["n_tokens"] = written
        atomic_write_json(out / MANIFEST, manifest)

    source_items = iter(items)
    skipped = sum(1 for _ in itertools.islice(source_items, manifest["position"]))
    if skipped < manifest["position"]:
        raise ValueError(f"the cache {str(out)!r} has read {manifest['position']} items of its "
                         f"data, but this data has only {skipped}: pass the same data, from its "
                         "start, to continue it")
    position, skip_rows = resume_point
    exhausted = False
    done = min(written + pending(), n_tokens)
    with progress_bar(desc=f"writing activation cache ({out.name})", total=n_tokens, initial=done,
                      enabled=config.progress, unit="tok") as bar:
        while written + pending() < n_tokens:
            batch, used = [], 0
            for text in source_items:
                used += 1
                if text.strip():
                    batch.append(text)
                    if len(batch) == config.batch_texts:
                        break
            if not batch:
                exhausted = True
                break
            with torch.no_grad():
                rows = collect_rows(batch)
            total, start = rows[0].shape[0], skip_rows
            end = min(total, start + n_tokens - written - pending())
            after = (position, end) if end < total else (position + used, 0)
            segments.append([(position, start), [r[start:end] for r in rows], after])
            bar.update(end - start)
            position, skip_rows, resume_point = position + used, 0, after
            while pending() >= config.shard_tokens:
                write_shard(config.shard_tokens)
        if pending():
            write_shard(pending())
    # nothing left unwritten (a text batch whose tokens were all dropped leaves none either)
    if not pending():
        manifest["position"], manifest["position_rows"] = resume_point
    manifest["exhausted"] = exhausted
    manifest["n_tokens"] = written
    # over the text batches this call read (the one cut at n_tokens whole)
    manifest["filtered"] = counts.summary()
    atomic_write_json(out / MANIFEST, manifest)
    listed = {shard["file"] for shard in shards}
    # left by a crash between a shard and its manifest
    for stray in out.glob("shard_*.safetensors"):
        if stray.name not in listed:
            stray.unlink(missing_ok=True)
    return out


def _save_shard(out: Path, index: int, rows: list[torch.Tensor]) -> dict[str, Any]:
    """Write one shard atomically (one tensor per hook point) and return its manifest record."""
    tensors = {hook_key(i): r.contiguous() for i, r in enumerate(rows)}
    name = shard_name(index)
    atomic_write(out / name, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    return {"file": name, "tokens": int(rows[0].shape[0])}


def cache_from_tensors(out: str | Path, activations: Any, shard_tokens: int = 65536,
                       model_name: str = "tensors", source: str = "in-memory tensors") -> Path:
    """Write activations already in memory as a cache (e.g. synthetic data, or a saved safetensors
    file): a `[n, d]` tensor, an `(x, y)` pair, or a dict of them by name, rows aligned. `out` must
    not hold a cache yet."""
    shard_tokens = integer("shard_tokens", shard_tokens)
    out = Path(out)
    if (out / MANIFEST).exists():
        raise ValueError(f"{str(out)!r} already holds an activation cache; pass a new folder")
    named = activations if isinstance(activations, dict) else {"activations": activations}
    hooks, sides, entries = [], [], {}
    for name, value in named.items():
        pair = isinstance(value, (tuple, list))
        entries[name] = list(range(len(sides), len(sides) + (2 if pair else 1)))
        for io, tensor in zip(("input", "output"), value if pair else (value,)):
            if (not isinstance(tensor, torch.Tensor) or tensor.ndim != 2
                    or not tensor.is_floating_point()):
                raise TypeError(f"activations[{name!r}] must be a floating [n, d] tensor (or a "
                                "pair of them), got "
                                f"{getattr(tensor, 'shape', type(tensor).__name__)}")
            hooks.append({"path": name, "io": io if pair else "output", "name": name})
            sides.append(tensor.detach().cpu())
    if len({t.shape[0] for t in sides}) != 1 or len({t.dtype for t in sides}) != 1:
        raise ValueError(f"all activations must have the same rows and dtype, got "
                         f"{[(tuple(t.shape), t.dtype) for t in sides]}")
    single = not isinstance(activations, dict)
    io = buffer_io([hook["io"] for hook in hooks]) if single else "out"  # a dict: pairs by entry
    manifest = resumable_manifest(out, {
        "model": model_name, "source": source, "io": io, "hooks": hooks,
        "entries": None if single else entries, "widths": [t.shape[1] for t in sides],
        "dtype": str(sides[0].dtype).removeprefix("torch."), "ctx_len": None, "remove_bos": None,
        "add_special_tokens": None, "max_activation_norm_multiple": None, "batch_texts": None,
        "shard_tokens": shard_tokens,
        "model_fingerprint": None})
    n = sides[0].shape[0]
    manifest["shards"] = [_save_shard(out, i, [t[start : start + shard_tokens] for t in sides])
                          for i, start in enumerate(range(0, n, shard_tokens))]
    manifest.update(n_tokens=n, position=n, exhausted=True)
    atomic_write_json(out / MANIFEST, manifest)
    return out

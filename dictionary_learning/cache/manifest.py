"""The cache folder's format: shard names, the manifest (its settings and validation) and opening a
shard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..files import atomic_write_json, error_summary, read_json

FORMAT, VERSION, MANIFEST = "dictionary_learning.activation_cache", 1, "manifest.json"
# settings a resumed write_cache must share with the cache it continues
SETTINGS = ("model", "source", "io", "hooks", "entries", "widths", "dtype", "ctx_len", "remove_bos",
            "add_special_tokens", "max_activation_norm_multiple", "batch_texts", "shard_tokens",
            "model_fingerprint")
# settings caches written before them lack (unknown, so not compared)
OPTIONAL = ("model_fingerprint",)
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def hook_key(index: int) -> str:
    return f"hook_{index}"


def resumable_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the cache at `out` if its settings equal `settings` (a clear
    error otherwise), or a new one (written at once, so even an empty cache records its
    settings)."""
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        saved = {key: manifest.get(key) for key in SETTINGS}
        now = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
        changed = [key for key in SETTINGS if saved[key] != now[key]
                   and not (key in OPTIONAL and None in (saved[key], now[key]))]
        if changed:
            raise ValueError(f"the cache {str(out)!r} was written with other settings; refusing to "
                             "mix them: "
                             + "; ".join(f"{key}: {saved[key]!r} in the cache, {now[key]!r} now"
                                         for key in changed)
                             + " (use another folder)")
        return manifest
    foreign = [p.name for p in out.iterdir()
               if not (p.name.startswith(".") or p.name.startswith("shard_"))] \
        if out.is_dir() else []
    if foreign:
        raise ValueError(f"out {str(out)!r} holds files that are not an activation cache "
                         f"({sorted(foreign)[:5]}) and no {MANIFEST}: pass a new or empty folder")
    manifest = {"format": FORMAT, "version": VERSION, **settings, "n_tokens": 0, "shards": [],
                "position": 0, "position_rows": 0, "exhausted": False}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of the cache folder `path`."""
    file = Path(path) / MANIFEST
    if not file.exists():
        raise ValueError(f"{str(path)!r} is not an activation cache: it has no {MANIFEST} (write "
                         "one with write_cache or `python -m dictionary_learning collect --out "
                         "FOLDER`)")
    manifest = read_json(file, expect=dict)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{str(file)!r} is not an activation cache manifest of version {VERSION}: "
                         f"format {manifest.get('format')!r}, version {manifest.get('version')!r}")
    missing = [key for key in (*SETTINGS, "shards", "n_tokens", "position", "position_rows")
               if key not in manifest and key not in OPTIONAL]
    if missing:
        raise ValueError(f"{str(file)!r} is corrupt: it lacks the keys {missing}")
    shards, widths = manifest["shards"], manifest["widths"]
    if not (isinstance(shards, list) and all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                             and isinstance(s.get("tokens"), int)
                                             and s["tokens"] > 0 for s in shards)):
        raise ValueError(f"{str(file)!r} is corrupt: 'shards' must be a list of {{file, tokens > "
                         f"0}}, got {shards!r:.200}")
    if not isinstance(widths, list) or len(widths) != len(manifest["hooks"]):
        raise ValueError(f"{str(file)!r} is corrupt: {len(manifest['hooks'])} hook points but "
                         f"widths {widths!r}")
    if manifest["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"{str(file)!r} names dtype {manifest['dtype']!r}; expected one of "
                         f"{list(SAFETENSORS_DTYPES)}")
    return manifest


def open_shard(file: Path):
    if not file.exists():
        raise ValueError(f"shard {str(file)!r} listed in the cache's {MANIFEST} is missing")
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"shard {str(file)!r} is not a readable safetensors file (corrupt or "
                         f"truncated?): {error_summary(error)}") from error

"""Files: atomic writes, JSON-safe configs, the cache folder and PNG figures.

Every file the toolkit writes goes through `atomic_write`: it is written under a temporary name in the same folder
and renamed onto its final name, so a crash never leaves a half-written file there. This module imports nothing of
the package, so every room may use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch


def cache_dir() -> Path:
    """Where converted models and corpora are cached (`$DICTIONARY_LEARNING_CACHE`, else ~/.cache/...)."""
    root = os.environ.get("DICTIONARY_LEARNING_CACHE") or Path.home() / ".cache" / "dictionary_learning"
    return Path(root)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename the temporary file onto `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_safe(config: dict[str, Any]) -> dict[str, Any]:
    """A config with classes, dtypes and devices turned into names, ready for json.dumps."""

    def convert(value):
        if isinstance(value, type):
            return value.__name__
        if isinstance(value, (torch.dtype, torch.device)):
            return str(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    result = convert(config)
    json.dumps(result)  # fail here, not halfway through a file
    return result


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, so plots need no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path) -> None:
    """Write a matplotlib figure as a PNG atomically, then close it."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    pyplot().close(figure)

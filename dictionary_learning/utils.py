"""Saving, loading and sharing dictionaries.

A saved dictionary is a folder with upstream's `ae.pt` (a torch state dict) and `config.json`
(`{"trainer": {...}, "buffer": {...}}`), plus a `model.safetensors` copy of the same weights. Every file is written
to a temporary name and renamed, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .dictionary import Dictionary, dictionary_class, load_state_dict
from .files import atomic_write, atomic_write_json, pyplot, read_json, save_figure  # noqa: F401 (also importable here)


def save_dictionary(dictionary: Dictionary, directory: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Write `ae.pt`, `model.safetensors` and `config.json` into `directory` (atomically, file by file)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in dictionary.state_dict().items()}
    config = dict(config or {})
    config.setdefault("trainer", {})
    config["trainer"] = {**dictionary.dictionary_config(), **config["trainer"]}
    atomic_write(directory / "ae.pt", lambda tmp: torch.save(state, tmp))
    atomic_write(directory / "model.safetensors",
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt", "dict_class": type(dictionary).__name__}))
    atomic_write_json(directory / "config.json", config)
    return directory


def load_dictionary(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
                    ) -> tuple[Dictionary, dict[str, Any]]:
    """(dictionary, config) from a folder saved here or by upstream dictionary_learning (`ae.pt` + `config.json`)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"expected a folder with config.json and ae.pt (or model.safetensors), got {str(path)!r}")
    config = read_json(path / "config.json")
    trainer_config = config.get("trainer", config)
    cls = dictionary_class(trainer_config.get("dict_class"), source=str(path / "config.json"))
    state = load_state_dict(path)
    # a square transcoder looks like an SAE in its weights: the config says which it is
    dictionary = cls.from_state_dict(state, transcoder=trainer_config.get("transcoder"))
    if "threshold" in dict(dictionary.named_buffers()) and "threshold" not in state:  # older upstream TopK saves
        state["threshold"] = torch.tensor(-1.0)
    dictionary.load_state_dict(state)
    return dictionary.to(device=device, dtype=dtype), config


def push_to_hub(directory: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                path_in_repo: str | None = None, commit_message: str = "Upload dictionary") -> str:
    """Upload a saved dictionary folder to a Hugging Face model repo (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ValueError(f"{str(directory)!r} is not a saved dictionary (no config.json)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, path_in_repo=path_in_repo,
                             commit_message=commit_message, allow_patterns=["ae.pt", "model.safetensors", "config.json"])
    return str(info)


def pull_from_hub(repo_id: str, subfolder: str | None = None, revision: str | None = None,
                  device: str = "cpu", token: str | None = None) -> tuple[Dictionary, dict[str, Any]]:
    """Download a dictionary folder from the hub (or its local cache) and load it."""
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*" if subfolder else "*"]
    local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token)
    return load_dictionary(Path(local) / subfolder if subfolder else local, device=device)


"""Saving, loading and sharing dictionaries.

A saved dictionary is a folder with upstream's `ae.pt` (a torch state dict) and `config.json`
(`{"trainer": {...}, "buffer": {...}}`), plus a `model.safetensors` copy of the same weights. Every
file is written to a temporary name and renamed, so a crash never leaves a half-written file behind.

Also upstream's helpers at upstream's import path: its text generators (from
`compat/generators.py`), `get_nested_folders`, `get_submodule` and `truncate_model` (module paths
from the family adapters).
"""

from __future__ import annotations

import functools
import gc
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .compat.generators import (  # noqa: F401 (upstream's names at this path)
    hf_dataset_to_generator,
    hf_mixed_dataset_to_generator,
    hf_sequence_packing_dataset_to_generator,
    randomly_remove_system_prompt,
    simple_hf_mixed_dataset_to_generator,
    zst_to_generator,
)
from .dictionary import AutoEncoder, Dictionary, dictionary_class, load_state_dict
from .files import (  # noqa: F401
    atomic_folder,
    atomic_write,
    atomic_write_json,
    inside,
    pyplot,
    read_json,
    save_figure,
)
from .models import get_adapter, n_layers, torch_model

DICTIONARY_FILES = ("ae.pt", "model.safetensors", "config.json")


def save_dictionary(dictionary: Dictionary, directory: str | Path,
                    config: dict[str, Any] | None = None) -> Path:
    """Write `ae.pt`, `model.safetensors` and `config.json` into `directory`, the folder replaced as
    a whole (a reader sees the previous save or this one, never a mix; other entries there, such as
    upstream's `checkpoints/`, are kept). Transcoders' files carry an `is_transcoder` entry, so
    upstream's loaders refuse them instead of misreading them."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = dictionary.saved_state_dict()
    config = dict(config or {})
    config.setdefault("trainer", {})
    config["trainer"] = {**dictionary.dictionary_config(), **config["trainer"]}
    with atomic_folder(directory, owned=lambda name: name in DICTIONARY_FILES) as staging:
        atomic_write(staging / "ae.pt", lambda tmp: torch.save(state, tmp))
        atomic_write(staging / "model.safetensors",
                     lambda tmp: save_file(state, tmp,
                                           metadata={"format": "pt",
                                                     "dict_class": type(dictionary).__name__}))
        atomic_write_json(staging / "config.json", config)
    return directory


def load_dictionary(base_path: str | Path, device: str | torch.device | None = "cpu",
                    dtype: torch.dtype | None = None,
                    normalize_decoder: bool = True) -> tuple[Dictionary, dict[str, Any]]:
    """(dictionary, config) from a folder saved here or by upstream dictionary_learning
    (`ae.pt` + `config.json`), as upstream loads it: in float32 (unless `dtype`), and an
    `AutoEncoder`'s decoder renormalised to unit columns with its encoder rescaled to match (the
    same reconstructions; each feature in units of its unit-norm decoder direction;
    `normalize_decoder=False` keeps the saved weights as they are)."""
    path = Path(base_path)
    if not (path / "config.json").exists():
        raise ValueError("expected a folder with config.json and ae.pt (or model.safetensors), got "
                         f"{str(path)!r}")
    config = read_json(path / "config.json", expect=dict)
    trainer_config = config.get("trainer", config)
    if not isinstance(trainer_config, dict):
        raise ValueError(f"{str(path / 'config.json')!r}: 'trainer' must be a JSON object, got "
                         f"{type(trainer_config).__name__}")
    cls = dictionary_class(trainer_config.get("dict_class"), source=str(path / "config.json"))
    # a square transcoder looks like an SAE in its weights: the config (or the file's marker) says
    # which it is
    try:
        dictionary = cls.from_saved_state(load_state_dict(path),
                                          transcoder=trainer_config.get("transcoder"))
    except KeyError as error:
        raise ValueError(f"the weights in {str(path)!r} lack {error} that a {cls.__name__} "
                         "needs") from error
    # config.json and the weights must agree
    for key in ("activation_dim", "dict_size", "output_dim", "k"):
        if key in trainer_config and hasattr(dictionary, key):
            held = getattr(dictionary, key)
            held = int(held) if isinstance(held, torch.Tensor) else held
            # (IdentityDict's widths are not in weights)
            if held is not None and trainer_config[key] != held:
                raise ValueError(f"{str(path)!r}: config.json says {key}={trainer_config[key]!r} "
                                 f"but the weights hold {key}={held!r}; the folder mixes two saves")
    bad = [name for name, tensor in dictionary.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        warnings.warn(f"{str(path)!r}: the weights {bad} hold NaN / inf values (a diverged run?)")
    if normalize_decoder and isinstance(dictionary, AutoEncoder):
        dictionary.normalize_decoder()
    return dictionary.to(device=device, dtype=dtype), config


def push_to_hub(directory: str | Path, repo_id: str, token: str | None = None,
                private: bool = False, path_in_repo: str | None = None,
                commit_message: str = "Upload dictionary") -> str:
    """Upload a saved dictionary folder, or a saved SCAE suite folder (suite.json, its connections
    and a dictionary folder per module), to a Hugging Face model repo (created if missing); returns
    the commit URL. Other files in the folder (checkpoints, notes) are not uploaded."""
    from huggingface_hub import HfApi

    if path_in_repo is not None:
        _relative_name("path_in_repo", path_in_repo)
    directory = Path(directory)
    if (directory / "suite.json").exists():
        patterns = ["suite.json", "connections.safetensors",
                    *(f"*/{name}" for name in DICTIONARY_FILES)]
    elif (directory / "config.json").exists():
        patterns = list(DICTIONARY_FILES)
    else:
        raise ValueError(f"{str(directory)!r} is not a saved dictionary (no config.json) or SCAE "
                         "suite (no suite.json)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, path_in_repo=path_in_repo,
                             commit_message=commit_message, allow_patterns=patterns)
    return str(info)


def download_from_hub(repo_id: str, subfolder: str | None = None, revision: str | None = None,
                      token: str | None = None) -> Path:
    """The local path of a folder of a hub repo (downloaded, or from the local cache), `subfolder`
    inside it (a relative path: never one that leads out of the downloaded snapshot)."""
    from huggingface_hub import snapshot_download

    if subfolder:
        _relative_name("subfolder", subfolder)
    patterns = [f"{subfolder}/*" if subfolder else "*"]
    local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token)
    return inside(local, subfolder, "subfolder") if subfolder else Path(local)


def _relative_name(name: str, value: Any) -> None:
    """A folder inside a repo: a relative path with no `..` (checked before any network call)."""
    if (not isinstance(value, str) or not value.strip() or value.startswith(("/", "~"))
            or ".." in Path(value).parts):
        raise ValueError(f"{name} must be a relative folder inside the repo such as 'layer_6', got "
                         f"{value!r}")


def pull_from_hub(repo_id: str, subfolder: str | None = None, revision: str | None = None,
                  device: str = "cpu",
                  token: str | None = None) -> tuple[Dictionary, dict[str, Any]]:
    """Download a dictionary folder from the hub (or its local cache) and load it."""
    return load_dictionary(download_from_hub(repo_id, subfolder, revision, token), device=device)


# --------------------------------------------------------------------------------------------------
# upstream's folders and model helpers


def get_nested_folders(path: str | os.PathLike) -> list[str]:
    """Every folder under `path` (itself included) holding an `ae.pt`, in sorted walk order. Folders
    named `checkpoints` hold intermediate saves, not dictionaries of their own, and are not
    searched."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "checkpoints")
        if "ae.pt" in files:
            found.append(root)
    return found


def _block_path(model: Any, layer: int) -> str:
    layers = n_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers:
        raise ValueError(f"layer must be an int in [0, {layers - 1}] for this model, got {layer!r}")
    return get_adapter(model).block(layer)


def get_submodule(model: Any, layer: int) -> Any:
    """Decoder block `layer` (its output is the residual stream) of an nnsight or Hugging Face
    model: an nnsight Envoy for the former, the torch module for the latter."""
    return functools.reduce(getattr, _block_path(model, layer).split("."), model)


def truncate_model(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Drop the blocks after `layer` and replace the unembedding by an identity, in place, to save
    memory when only activations up to `layer` are read (the model's "logits" are then the final
    norm of block `layer`'s output). Prints the parameter counts before and after; returns the
    model."""
    if torch_model(model) is not model:
        raise TypeError("truncate_model takes a Hugging Face model (torch.nn.Module); truncate it "
                        f"before wrapping it in nnsight, got {type(model).__name__}")
    adapter = get_adapter(model)
    _block_path(model, layer)
    print(f"Model parameters before truncation: {sum(p.numel() for p in model.parameters()):,}")
    for path in (adapter.layers, adapter.unembed):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        kept = getattr(parent, name)[: layer + 1] if path == adapter.layers else None
        replacement = kept if kept is not None else torch.nn.Identity()
        delattr(parent, name)
        setattr(parent, name, replacement)
    print(f"Model parameters after truncation: {sum(p.numel() for p in model.parameters()):,}")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model

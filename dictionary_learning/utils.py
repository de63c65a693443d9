"""Saving, loading and sharing dictionaries.

A saved dictionary is a folder with upstream's `ae.pt` (a torch state dict) and `config.json`
(`{"trainer": {...}, "buffer": {...}}`), plus a `model.safetensors` copy of the same weights. Every
file is written to a temporary name and renamed, so a crash never leaves a half-written file behind.

Also upstream's helpers at upstream's import path: text generators over hub datasets, local files
and `.jsonl.zst` archives (`hf_dataset_to_generator`, `zst_to_generator`, the mixed /
sequence-packed generators), `get_nested_folders`, `get_submodule` and `truncate_model` (module
paths from the family adapters).
"""

from __future__ import annotations

import functools
import gc
import io
import json
import os
import random
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

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


DICTIONARY_FILES = ["ae.pt", "model.safetensors", "config.json"]


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
        patterns = DICTIONARY_FILES
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
    if not isinstance(value, str) or not value.strip() or value.startswith(("/", "~")) or ".." in Path(value).parts:
        raise ValueError(f"{name} must be a relative folder inside the repo such as 'layer_6', got "
                         f"{value!r}")


def pull_from_hub(repo_id: str, subfolder: str | None = None, revision: str | None = None,
                  device: str = "cpu",
                  token: str | None = None) -> tuple[Dictionary, dict[str, Any]]:
    """Download a dictionary folder from the hub (or its local cache) and load it."""
    return load_dictionary(download_from_hub(repo_id, subfolder, revision, token), device=device)


# --------------------------------------------------------------------------------------------------
# upstream's text generators, folders and model helpers

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv",
                   ".parquet": "parquet"}


def _dataset_rows(name: str, split: str, streaming: bool):
    """The rows of a dataset: a hub id, a local dataset folder, or one local `.jsonl` / `.json` /
    `.txt` / `.csv` / `.parquet` file (read offline through `datasets`)."""
    from datasets import load_dataset

    path = Path(name)
    if path.is_file():
        if path.suffix not in _LOCAL_BUILDERS:
            raise ValueError("expected a dataset id, a folder or a file ending in "
                             f"{sorted(_LOCAL_BUILDERS)}, got {name!r}")
        return load_dataset(_LOCAL_BUILDERS[path.suffix], data_files=str(path), split=split,
                            streaming=streaming)
    return load_dataset(name, split=split, streaming=streaming)


def hf_dataset_to_generator(dataset_name: str, split: str = "train",
                            streaming: bool = True) -> Iterator[str]:
    """The `text` field of every row of a dataset (hub id, local dataset folder or local data file),
    in order."""
    rows = _dataset_rows(dataset_name, split, streaming)
    return (row["text"] for row in rows)


def zst_to_generator(data_path: str | os.PathLike) -> Iterator[str]:
    """The `text` field of every line of a zstandard-compressed JSON-lines file (`.jsonl.zst`, as
    the Pile ships)."""
    try:
        import zstandard
    except ImportError as error:
        raise ImportError("zst_to_generator needs the 'zstandard' package: pip install "
                          "zstandard") from error
    path = Path(data_path)
    if not path.is_file():
        raise ValueError(f"expected a .jsonl.zst file, got {str(data_path)!r} (no such file)")

    def lines() -> Iterator[str]:
        with open(path, "rb") as compressed:
            reader = zstandard.ZstdDecompressor().stream_reader(compressed)
            for line in io.TextIOWrapper(reader, encoding="utf-8"):
                yield json.loads(line)["text"]

    return lines()


def randomly_remove_system_prompt(text: str, freq: float, system_prompt: str | None = None) -> str:
    """With probability `freq` (Python's `random`), `text` without `system_prompt`; unchanged
    without one."""
    if system_prompt and random.random() < freq:
        if system_prompt not in text:
            raise ValueError(f"system prompt {system_prompt[:60]!r} not found in the chat text "
                             f"{text[:120]!r}")
        text = text.replace(system_prompt, "")
    return text


def _ratio(fraction: float, name: str) -> tuple[int, int]:
    """(n_first, n_second) items per round for a mix with `fraction` of the first source (0.9 ->
    9, 1)."""
    if not 0 < fraction < 1:
        raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {fraction!r}")
    ratio = Fraction(fraction).limit_denominator()
    return ratio.numerator, ratio.denominator - ratio.numerator


def _packed(rows: Iterator[dict], key: str, min_chars: int, render, join: str, prefix: str,
            pack: bool
            ) -> Iterator[str]:
    """Samples `prefix + render(row[key])`; with `pack`, consecutive rendered rows joined by `join`
    until they hold `min_chars` characters. Ends when `rows` runs out (a partial last pack is
    dropped)."""
    for row in rows:
        parts = [render(row[key])]
        length = len(parts[0])
        while pack and length < min_chars:
            row = next(rows, None)
            if row is None:
                return
            parts.append(render(row[key]))
            length += len(parts[-1])
        yield prefix + join.join(parts)


def _bos_eos(tokenizer: Any) -> tuple[str, str]:
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no eos_token to separate "
                         "packed texts")
    return tokenizer.bos_token or tokenizer.eos_token, tokenizer.eos_token


def _check_min_chars(min_chars: int) -> None:
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars <= 0:
        raise ValueError(f"min_chars must be a positive int, got {min_chars!r}")


def _interleave(first: Iterator[str], n_first: int, second: Iterator[str],
                n_second: int) -> Iterator[str]:
    """n_first items of `first`, then n_second of `second`, again and again, until either runs
    out."""
    while True:
        for source, count in ((first, n_first), (second, n_second)):
            for _ in range(count):
                item = next(source, None)
                if item is None:
                    return
                yield item


def hf_mixed_dataset_to_generator(
    tokenizer: Any,
    pretrain_dataset: str = "HuggingFaceFW/fineweb",
    chat_dataset: str = "lmsys/lmsys-chat-1m",
    min_chars: int = 1,
    pretrain_frac: float = 0.9,
    split: str = "train",
    streaming: bool = True,
    pretrain_key: str = "text",
    chat_key: str = "conversation",
    sequence_pack_pretrain: bool = True,
    sequence_pack_chat: bool = False,
    system_prompt_to_remove: str | None = None,
    system_prompt_removal_freq: float = 0.9,
) -> Iterator[str]:
    """Pretraining text and chats mixed at `pretrain_frac` (0.9: 9 pretrain samples, then 1 chat,
    repeated).

    Pretrain samples are `bos + text`, or packed `bos + text + eos + text ...` of at least
    `min_chars` characters (the tokenizer's eos stands in for a missing bos). Chats are rendered by
    the tokenizer's chat template (which adds its own BOS), each losing `system_prompt_to_remove`
    with probability `system_prompt_removal_freq`, and packed by plain concatenation with
    `sequence_pack_chat`. Ends when either dataset runs out.
    """
    n_pretrain, n_chat = _ratio(pretrain_frac, "pretrain_frac")
    _check_min_chars(min_chars)
    bos, eos = _bos_eos(tokenizer)
    pretrain_rows = iter(_dataset_rows(pretrain_dataset, split, streaming))
    chat_rows = iter(_dataset_rows(chat_dataset, split, streaming))

    def chat(conversation: Any) -> str:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        return randomly_remove_system_prompt(text, system_prompt_removal_freq,
                                             system_prompt_to_remove)

    pretrain = _packed(pretrain_rows, pretrain_key, min_chars, str, eos, bos,
                       sequence_pack_pretrain)
    chats = _packed(chat_rows, chat_key, min_chars, chat, "", "", sequence_pack_chat)
    return _interleave(pretrain, n_pretrain, chats, n_chat)


def hf_sequence_packing_dataset_to_generator(
    tokenizer: Any,
    pretrain_dataset: str = "HuggingFaceFW/fineweb",
    min_chars: int = 1,
    split: str = "train",
    streaming: bool = True,
    pretrain_key: str = "text",
    sequence_pack_pretrain: bool = True,
) -> Iterator[str]:
    """Samples `bos + text`, or packed `bos + text + eos + text ...` of at least `min_chars`
    characters."""
    _check_min_chars(min_chars)
    bos, eos = _bos_eos(tokenizer)
    rows = iter(_dataset_rows(pretrain_dataset, split, streaming))
    return _packed(rows, pretrain_key, min_chars, str, eos, bos, sequence_pack_pretrain)


def simple_hf_mixed_dataset_to_generator(
    main_name: str,
    aux_name: str,
    main_frac: float = 0.9,
    split: str = "train",
    streaming: bool = True,
    main_key: str = "text",
    aux_key: str = "text",
) -> Iterator[str]:
    """Texts of two datasets mixed at `main_frac` (0.9: 9 from the main one, then 1 from the
    auxiliary one, repeated); ends when either runs out."""
    n_main, n_aux = _ratio(main_frac, "main_frac")
    main = (row[main_key] for row in _dataset_rows(main_name, split, streaming))
    aux = (row[aux_key] for row in _dataset_rows(aux_name, split, streaming))
    return _interleave(main, n_main, aux, n_aux)


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
        replacement = getattr(parent, name)[: layer + 1] if path == adapter.layers else torch.nn.Identity()
        delattr(parent, name)
        setattr(parent, name, replacement)
    print(f"Model parameters after truncation: {sum(p.numel() for p in model.parameters()):,}")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model

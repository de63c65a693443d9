"""Upstream's text generators, at upstream's import path `dictionary_learning.utils`: the `text`
field of hub datasets, local data files and `.jsonl.zst` archives (`hf_dataset_to_generator`,
`zst_to_generator`), and the mixed / sequence-packed generators of chat and pretraining data."""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

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

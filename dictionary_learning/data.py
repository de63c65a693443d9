"""Text sources: iterators of strings for the ActivationBuffer.

- `hf_dataset_texts("monology/pile-uncopyrighted")`: a Hugging Face dataset, streamed (where the hub
  is reachable).
- `local_texts("notes/")`: `.txt` / `.jsonl` files or folders of them, read through `datasets`.
- `default_corpus()`: the offline default, English prose that every Python installation carries
  (below).
- `text_source(spec)`: any of the above from one string (what the command line takes).

The offline default corpus, "python-docs": the reference topics of the Python documentation that
CPython ships as `pydoc_data.topics` plus the docstrings (300 characters or longer) of the standard
library, cut into passages of about `passage_chars` characters at paragraph boundaries. Under Python
3.11 it is ~1.5 MB of English text, about 0.36M SmolLM2 tokens (see README). It is extracted once
and cached as a text file; replace it by passing any other source to the buffer, e.g.
`local_texts("my_corpus/")`.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .files import atomic_write_text, cache_dir, error_summary

DEFAULT_CORPUS = "python-docs"
PASSAGE_CHARS = 600  # ~140 SmolLM2 tokens: one passage fills a 128-token context with little waste
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                "turtledemo"}


def passages(text: str, max_chars: int = PASSAGE_CHARS) -> Iterator[str]:
    """Cut text into passages of at most ~max_chars, joining short paragraphs and splitting long
    ones at spaces."""
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    current = ""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        # cut by moving a start index: re-slicing the rest at every cut is quadratic in a long
        # paragraph
        start = 0
        while len(paragraph) - start > max_chars:
            cut = paragraph.rfind(" ", start, start + max_chars)
            cut = cut if cut > start + max_chars // 2 else start + max_chars
            if current:
                yield current
                current = ""
            yield paragraph[start:cut]
            start = cut + 1 if cut < len(paragraph) and paragraph[cut] == " " else cut
        paragraph = paragraph[start:]
        if not paragraph:
            continue
        if current and len(current) + 1 + len(paragraph) > max_chars:
            yield current
            current = paragraph
        else:
            current = f"{current}\n{paragraph}" if current else paragraph
    if current:
        yield current


def _python_docs_documents() -> Iterator[str]:
    """Documents of the python-docs corpus, in a fixed order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 300:
                    yield doc


def default_corpus_file() -> Path:
    """The python-docs corpus as a cached JSON-lines file (one passage per line), built on first
    use."""
    path = cache_dir() / "corpora" / f"{DEFAULT_CORPUS}-{PASSAGE_CHARS}.jsonl"
    if not path.exists():
        lines = (json.dumps({"text": p}) for doc in _python_docs_documents() for p in passages(doc))
        atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def default_corpus(repeat: bool = False) -> Iterator[str]:
    """Passages of the offline default corpus (python-docs); `repeat=True` cycles forever."""
    path = default_corpus_file()

    def once() -> Iterator[str]:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    return (text for _ in itertools.count() for text in once()) if repeat else once()


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.suffix in (".txt", ".jsonl", ".json") and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"no such file or folder: {str(path)!r}")
    if not files:
        raise ValueError(f"folder {str(path)!r} holds no .txt or .jsonl files")
    return files


def local_texts(
    path: str | os.PathLike, text_field: str = "text", max_chars: int | None = PASSAGE_CHARS
) -> Iterator[str]:
    """Texts from local `.txt` files (split into passages at blank lines) and `.jsonl` files
    (field `text_field`) or folders of them, streamed through `datasets`. `max_chars=None` yields
    documents / paragraphs whole. A missing path, or a folder with no such files, is refused at the
    call, not at the first text."""
    return _local_texts(_files(Path(path)), text_field, max_chars)


def _local_texts(files: list[Path], text_field: str, max_chars: int | None) -> Iterator[str]:
    from datasets import load_dataset

    for file in files:
        if file.suffix == ".txt":
            dataset = load_dataset("text", data_files=str(file), sample_by="document",
                                   split="train", streaming=True)
            field = "text"
        else:
            dataset = load_dataset("json", data_files=str(file), split="train", streaming=True)
            field = text_field
        for row in dataset:
            if field not in row:
                raise ValueError(f"{file}: expected a field {field!r} in each JSON line, found "
                                 f"{sorted(row)}")
            text = row[field]
            if not isinstance(text, str) or not text.strip():
                continue
            if max_chars is None:
                yield text
            else:
                yield from passages(text, max_chars)


def hf_dataset_texts(
    name: str, split: str = "train", text_field: str = "text", streaming: bool = True, **kwargs
) -> Iterator[str]:
    """Texts of a Hugging Face dataset, streamed by default (needs the hub, or a local dataset
    cache). The dataset is opened at the call, so an unknown or unreachable one is refused there."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split, streaming=streaming, **kwargs)
    # datasets raises many types (ConnectionError, HFValidationError, FileNotFoundError)
    except Exception as error:
        raise ValueError(f"cannot open the text source {name!r}: it is no local file or folder, "
                         f"and as a Hugging Face dataset: {error_summary(error)}") from error
    return _dataset_texts(dataset, text_field)


def _dataset_texts(dataset: Any, text_field: str) -> Iterator[str]:
    for row in dataset:
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            yield text


def text_source(spec: str | Iterable[str] | None = None, repeat: bool = False) -> Iterator[str]:
    """Resolve a text source: None / "python-docs" (the offline default), a local path, or a hub
    dataset id (optionally "name:split"). Iterables of strings pass through."""
    if spec is None or spec == DEFAULT_CORPUS:
        return default_corpus(repeat=repeat)
    if not isinstance(spec, str):
        return iter(spec)
    if (Path(spec).exists() or spec.endswith(("/", ".txt", ".jsonl", ".json"))
            or spec.startswith((".", "/", "~"))):
        # a path (a missing one is refused, not looked up on the hub)
        return local_texts(Path(spec).expanduser())
    name, _, split = spec.partition(":")
    return hf_dataset_texts(name, split=split or "train")

"""Text sources."""

import json

import pytest

from dictionary_learning import default_corpus, local_texts, text_source
from dictionary_learning.data import passages


def test_passages_keep_all_text_within_bounds():
    text = ("First paragraph is short.\n\n" + ("word " * 400)
            + "\n\n\nThird one.\nStill third.\n\nLast.")
    parts = list(passages(text, max_chars=120))
    assert all(0 < len(p) <= 120 for p in parts)
    assert " ".join(" ".join(parts).split()) == " ".join(text.split())
    with pytest.raises(ValueError, match="positive"):
        list(passages(text, max_chars=0))


def test_local_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("Alpha paragraph one.\n\nAlpha paragraph two.\n")
    rows = [{"text": "Beta document."}, {"text": ""}, {"text": "Gamma document."}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert list(local_texts(tmp_path / "b.jsonl")) == ["Beta document.", "Gamma document."]
    assert list(local_texts(tmp_path / "a.txt", max_chars=None)) == ["Alpha paragraph "
                                                                     "one.\n\nAlpha paragraph "
                                                                     "two.\n"]
    everything = list(local_texts(tmp_path))
    assert everything == ["Alpha paragraph one.\nAlpha paragraph two.", "Beta document.",
                          "Gamma document."]
    assert list(text_source(str(tmp_path))) == everything


def test_local_errors(tmp_path, monkeypatch):
    """A missing path or an empty folder is refused at the call (not at the first text), and
    text_source never looks a path up on the hub."""
    with pytest.raises(ValueError, match="no such file"):
        local_texts(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        local_texts(tmp_path / "empty")
    monkeypatch.chdir(tmp_path)
    for path in ("my_corpus/", "./corpus", "notes.txt", str(tmp_path / "absent")):
        with pytest.raises(ValueError, match="no such file or folder"):
            text_source(path)
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="expected a field 'text'"):
        list(local_texts(tmp_path / "c.jsonl"))


def test_default_corpus_is_english_and_deterministic():
    first = list(zip(range(200), default_corpus()))
    again = list(zip(range(200), default_corpus()))
    assert first == again
    texts = [t for _, t in first]
    assert all(isinstance(t, str) and t.strip() for t in texts)
    words = " ".join(texts).lower().split()
    common = sum(w in {"the", "of", "and", "a", "to", "is", "in"} for w in words)
    assert len(words) > 10_000 and common / len(words) > 0.1  # English prose, not code
    repeated = text_source(None, repeat=True)
    total = sum(1 for _ in default_corpus())
    assert sum(1 for _, _ in zip(range(total + 5), repeated)) == total + 5


def test_text_source_passes_iterables_through():
    assert list(text_source(["a", "b"])) == ["a", "b"]

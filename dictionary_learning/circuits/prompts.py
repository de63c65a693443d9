"""Prompt pairs for sparse feature circuits (Marks et al. 2024, "Sparse Feature Circuits").

A circuit is found by patching: the model reads a clean prompt and a patch prompt that differ in one
word, and the metric is the logit difference between the patch answer and the clean answer at the
last position. Each pair here is one line of the JSONL format of the paper's repository
(saprmarks/feature-circuits, `data/*.json`, read by its `load_examples`):

    {"clean_prefix": "The author", "patch_prefix": "The authors",
     "clean_answer": " is", "patch_answer": " are", "case": "simple"}

(answers begin with a space, as the next token does). The subject-verb agreement data is generated
here from templates and the small word lists below, not copied from the paper; the patch prompt
changes only the number of the noun the verb must agree with, and the answers swap. The four
cases, in this module's names (the paper's data file names in brackets):

- `simple`     "The author" -> " is"                                        [simple]
- `within_rc`  "The manager that the author" -> agrees with "author"        [within_rc]
- `across_rc`  "The author that the managers like" -> agrees with "author"  [rc]
- `nounpp`     "The author near the managers" -> agrees with "author"       [nounpp]

The paper's own files use `case` for the nouns' numbers ("singular", "plural_singular"); here it
names the template. Position-wise patching needs the clean and patch prompts to tokenize to the same
length and each answer to be one token: `single_token_pairs` keeps those, `encode_pairs` turns
them into tensors.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checks import integer
from ..files import atomic_write_text

AGREEMENT_CASES = ("simple", "within_rc", "across_rc", "nounpp")
JSON_KEYS = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer", "case")
_REQUIRED_KEYS = JSON_KEYS[:4]

# (singular, plural): professions and animals, a few with irregular plurals
NOUNS = (
    ("author", "authors"), ("manager", "managers"), ("doctor", "doctors"),
    ("teacher", "teachers"), ("lawyer", "lawyers"), ("farmer", "farmers"), ("pilot", "pilots"),
    ("senator", "senators"), ("engineer", "engineers"), ("painter", "painters"),
    ("nurse", "nurses"), ("student", "students"), ("officer", "officers"), ("woman", "women"),
    ("man", "men"), ("child", "children"), ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"),
    ("bird", "birds"), ("wolf", "wolves"), ("mouse", "mice"), ("fox", "foxes"),
)
# (singular, plural) simple-present transitive verbs: the verb inside an `across_rc` clause
TRANSITIVE_VERBS = (
    ("likes", "like"), ("knows", "know"), ("admires", "admire"), ("hates", "hate"),
    ("helps", "help"), ("trusts", "trust"),
)
# (singular, plural) the answers: auxiliaries and the simple-present verbs above
VERBS = (("is", "are"), ("was", "were"), ("has", "have"), ("does", "do"), *TRANSITIVE_VERBS)
PREPOSITIONS = ("near", "behind", "beside", "with")
RELATIVIZER = "that"

# each case's choices, in the order an index is decoded: name -> number of options
_N, _V = len(NOUNS), len(VERBS)
_SLOTS = {
    "simple": {"noun": _N, "verb": _V, "number": 2},
    "within_rc": {"noun": _N, "noun_number": 2, "other": _N - 1, "number": 2, "verb": _V},
    "across_rc": {"noun": _N, "other": _N - 1, "other_number": 2,
                  "inner_verb": len(TRANSITIVE_VERBS), "verb": _V, "number": 2},
    "nounpp": {"noun": _N, "preposition": len(PREPOSITIONS), "other": _N - 1,
               "other_number": 2, "verb": _V, "number": 2},
}


@dataclass(frozen=True)
class PromptPair:
    """A clean / patch prompt pair and the answer each should be continued with."""

    clean: str
    patch: str
    clean_answer: str
    patch_answer: str
    case: str = ""

    def __post_init__(self) -> None:
        for name in ("clean", "patch", "clean_answer", "patch_answer", "case"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"PromptPair.{name} must be a str, got "
                                 f"{type(value).__name__} {value!r}")
            if name != "case" and not value:
                raise ValueError(f"PromptPair.{name} must be a non-empty string, got ''")

    def to_json(self) -> dict[str, str]:
        """The pair as a JSON object with the paper's keys (`JSON_KEYS`)."""
        return {"clean_prefix": self.clean, "patch_prefix": self.patch,
                "clean_answer": self.clean_answer, "patch_answer": self.patch_answer,
                "case": self.case}

    @classmethod
    def from_json(cls, item: dict[str, Any] | str, where: str = "the item") -> PromptPair:
        """A pair from a JSON object (or one JSON line) with the paper's keys; `case` may be
        missing. `where` names the item in errors (e.g. "line 3 of data.jsonl")."""
        expected = f"a JSON object with string keys {list(_REQUIRED_KEYS)} (and optional 'case')"
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: expected {expected}, got invalid JSON "
                                 f"({error})") from error
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected {expected}, got {type(item).__name__} "
                             f"{item!r:.100}")
        missing = [key for key in _REQUIRED_KEYS if key not in item]
        if missing:
            raise ValueError(f"{where}: expected {expected}, missing {missing}; got keys "
                             f"{sorted(item)}")
        for key in JSON_KEYS:
            value = item.get(key, "")
            if not isinstance(value, str) or (key != "case" and not value):
                raise ValueError(f"{where}: expected {expected} with non-empty prompts and "
                                 f"answers, got {key}={value!r}")
        return cls(item["clean_prefix"], item["patch_prefix"], item["clean_answer"],
                   item["patch_answer"], item.get("case", ""))


def _choices(case: str, index: int) -> dict[str, int]:
    """Decode `index` into one option per slot of `case` (mixed radix)."""
    choices = {}
    for name, size in _SLOTS[case].items():
        index, choices[name] = divmod(index, size)
    return choices


def _pair(case: str, c: dict[str, int]) -> PromptPair:
    """The pair of `case` for the slot choices `c` (numbers: 0 singular, 1 plural)."""
    noun = NOUNS[c["noun"]]
    other = NOUNS[c["other"] + (c["other"] >= c["noun"])] if "other" in c else None  # != noun
    number, verb = c["number"], VERBS[c["verb"]]
    if case == "simple":
        clean, patch = f"The {noun[number]}", f"The {noun[1 - number]}"
    elif case == "within_rc":  # the verb agrees with the noun inside the relative clause
        head = f"The {noun[c['noun_number']]} {RELATIVIZER} the"
        clean, patch = f"{head} {other[number]}", f"{head} {other[1 - number]}"
    elif case == "across_rc":
        inner = f"{RELATIVIZER} the {other[c['other_number']]}"
        inner += f" {TRANSITIVE_VERBS[c['inner_verb']][c['other_number']]}"
        clean, patch = f"The {noun[number]} {inner}", f"The {noun[1 - number]} {inner}"
    else:  # nounpp
        phrase = f"{PREPOSITIONS[c['preposition']]} the {other[c['other_number']]}"
        clean, patch = f"The {noun[number]} {phrase}", f"The {noun[1 - number]} {phrase}"
    return PromptPair(clean, patch, " " + verb[number], " " + verb[1 - number], case)


def agreement_count(case: str) -> int:
    """How many distinct pairs `agreement_pairs(case)` can generate."""
    _check_case(case)
    count = 1
    for size in _SLOTS[case].values():
        count *= size
    return count


def _check_case(case: Any) -> None:
    if case not in AGREEMENT_CASES:
        raise ValueError(f"case must be one of {AGREEMENT_CASES}, got {case!r}")


def agreement_pairs(case: str, n: int | None = None, seed: int = 0) -> list[PromptPair]:
    """`n` distinct subject-verb agreement pairs of `case` (one of `AGREEMENT_CASES`), drawn
    without replacement in an order fixed by `seed`; n=None: all of them (`agreement_count`).
    Half the clean prompts have a singular agreeing noun, in expectation."""
    total = agreement_count(case)
    n = total if n is None else integer("n", n, low=0, high=total,
                                        high_name=f"agreement_count({case!r})")
    seed = integer("seed", seed, low=0)
    indices = random.Random(seed).sample(range(total), n)
    return [_pair(case, _choices(case, index)) for index in indices]


def _as_pairs(items: Iterable[PromptPair | dict[str, Any]], what: str) -> list[PromptPair]:
    if isinstance(items, (str, bytes, dict, PromptPair)) or not isinstance(items, Iterable):
        raise ValueError(f"{what} must be a list of PromptPair or dicts with keys "
                         f"{list(JSON_KEYS)}, got {type(items).__name__}")
    return [item if isinstance(item, PromptPair)
            else PromptPair.from_json(item, where=f"{what} item {index}")
            for index, item in enumerate(items)]


def load_prompt_pairs(
    source: str | os.PathLike | Iterable[PromptPair | dict[str, Any]],
) -> list[PromptPair]:
    """Pairs from a JSONL file in the paper's format (one object per line, blank lines skipped),
    or from a list of dicts / PromptPair objects. Bad lines raise a ValueError naming them."""
    if not isinstance(source, (str, os.PathLike)):
        return _as_pairs(source, "pairs")
    path = Path(source)
    pairs = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                pairs.append(PromptPair.from_json(line, where=f"line {number} of {str(path)!r}"))
    return pairs


def save_prompt_pairs(pairs: Iterable[PromptPair | dict[str, Any]],
                      path: str | os.PathLike) -> None:
    """Write pairs as JSONL in the paper's format, atomically (temporary file, then rename)."""
    lines = [json.dumps(pair.to_json()) + "\n" for pair in _as_pairs(pairs, "pairs")]
    atomic_write_text(path, "".join(lines))


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in
            tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def single_token_pairs(pairs: Iterable[PromptPair], tokenizer: Any,
                       add_special_tokens: bool = True) -> list[PromptPair]:
    """The pairs usable for position-wise patching: each answer one token (tokenized without
    special tokens), clean and patch prompts of the same token length, and each prompt followed by
    its answer tokenizing as the prompt's tokens then the answer's (no merge across the join)."""
    pairs = _as_pairs(pairs, "pairs")
    encoded = {field: _ids(tokenizer, [getattr(pair, field) for pair in pairs], special)
               for field, special in (("clean", add_special_tokens),
                                      ("patch", add_special_tokens),
                                      ("clean_answer", False), ("patch_answer", False))}
    joined = {side: _ids(tokenizer, [getattr(pair, side) + getattr(pair, f"{side}_answer")
                                     for pair in pairs], add_special_tokens)
              for side in ("clean", "patch")}
    kept = []
    for index, pair in enumerate(pairs):
        prompts = [encoded[side][index] for side in ("clean", "patch")]
        answers = [encoded[f"{side}_answer"][index] for side in ("clean", "patch")]
        if (all(len(answer) == 1 for answer in answers) and len(prompts[0]) == len(prompts[1])
                and all(prompt + answer == joined[side][index] for prompt, answer, side
                        in zip(prompts, answers, ("clean", "patch")))):
            kept.append(pair)
    return kept


def encode_pairs(pairs: Iterable[PromptPair], tokenizer: Any,
                 add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
    """Token ids of the pairs, without padding: `clean_ids`, `patch_ids` [n, seq] and
    `clean_answer_ids`, `patch_answer_ids` [n] (int64). Every prompt must tokenize to the same
    length and every answer to one token (`single_token_pairs` keeps such pairs; group pairs of
    different lengths before calling), else a ValueError names the first pair that does not."""
    pairs = _as_pairs(pairs, "pairs")
    if not pairs:
        raise ValueError("encode_pairs needs at least one pair, got none")
    fields = {"clean": add_special_tokens, "patch": add_special_tokens,
              "clean_answer": False, "patch_answer": False}
    ids = {field: _ids(tokenizer, [getattr(pair, field) for pair in pairs], special)
           for field, special in fields.items()}
    length = len(ids["clean"][0])
    for index, pair in enumerate(pairs):
        for field in fields:
            got, text = ids[field][index], getattr(pair, field)
            if field in ("clean", "patch") and len(got) != length:
                raise ValueError(
                    f"encode_pairs does not pad: every prompt must have {length} tokens (as pair "
                    f"0's clean prompt), got {len(got)} for pair {index}'s {field} prompt "
                    f"{text!r}; filter with single_token_pairs and group pairs by length first")
            if field.endswith("answer") and len(got) != 1:
                raise ValueError(f"every answer must be one token, got {len(got)} tokens {got} "
                                 f"for pair {index}'s {field} {text!r}; filter with "
                                 "single_token_pairs first")
    return {"clean_ids": torch.tensor(ids["clean"], dtype=torch.long),  # [n, seq]
            "patch_ids": torch.tensor(ids["patch"], dtype=torch.long),  # [n, seq]
            **{f"{field}_ids": torch.tensor([answer[0] for answer in ids[field]],
                                            dtype=torch.long)  # [n]
               for field in ("clean_answer", "patch_answer")}}

"""The agreement prompt pairs of the sparse-feature-circuits room: templates checked word by word
against the word lists, the paper's JSONL format, and tokenization with real tokenizers."""

import json

import pytest
import torch

from dictionary_learning.circuits.prompts import (
    AGREEMENT_CASES,
    NOUNS,
    PREPOSITIONS,
    TRANSITIVE_VERBS,
    VERBS,
    PromptPair,
    agreement_count,
    agreement_pairs,
    encode_pairs,
    load_prompt_pairs,
    save_prompt_pairs,
    single_token_pairs,
)
from dictionary_learning.models.loading import byte_tokenizer, smollm2_path

# the keys of saprmarks/feature-circuits' data/*.json lines, as its load_examples reads them
PAPER_KEYS = {"clean_prefix", "patch_prefix", "clean_answer", "patch_answer", "case"}
# per case: number of words, and the word (index) whose number the verb agrees with
LAYOUT = {"simple": (2, 1), "within_rc": (5, 4), "across_rc": (6, 1), "nounpp": (5, 1)}

NOUN_NUMBER = {form: number for pair in NOUNS for number, form in enumerate(pair)}
NOUN_PAIR = {form: pair for pair in NOUNS for form in pair}
VERB_NUMBER = {form: number for pair in VERBS for number, form in enumerate(pair)}
VERB_PAIR = {form: pair for pair in VERBS for form in pair}
INNER_VERB_NUMBER = {form: number for pair in TRANSITIVE_VERBS for number, form in enumerate(pair)}


def test_word_lists_are_consistent():
    for pairs in (NOUNS, VERBS, TRANSITIVE_VERBS):
        forms = [form for pair in pairs for form in pair]
        assert len(forms) == len(set(forms)), "a word is listed twice or as both numbers"
        assert all(singular != plural for singular, plural in pairs)
    assert set(AGREEMENT_CASES) == set(LAYOUT)


@pytest.mark.parametrize("case", AGREEMENT_CASES)
def test_patch_changes_only_the_number_of_the_agreeing_noun(case):
    n_words, position = LAYOUT[case]
    pairs = agreement_pairs(case, n=300, seed=3)
    assert len(pairs) == 300 and len(set(pairs)) == 300
    clean_numbers = set()
    for pair in pairs:
        assert pair.case == case
        clean, patch = pair.clean.split(), pair.patch.split()
        assert len(clean) == len(patch) == n_words and clean[0] == patch[0] == "The"
        differing = [i for i, (a, b) in enumerate(zip(clean, patch)) if a != b]
        assert differing == [position], (pair, differing)
        noun, patch_noun = clean[position], patch[position]
        assert NOUN_PAIR[noun] == NOUN_PAIR[patch_noun]  # one noun, the other number
        assert NOUN_NUMBER[noun] != NOUN_NUMBER[patch_noun]
        # the answers: one verb, in the number of the agreeing noun, swapped in the patch
        assert pair.clean_answer[0] == pair.patch_answer[0] == " "
        answer, patch_answer = pair.clean_answer[1:], pair.patch_answer[1:]
        assert VERB_PAIR[answer] == VERB_PAIR[patch_answer]
        assert VERB_NUMBER[answer] == NOUN_NUMBER[noun]
        assert VERB_NUMBER[patch_answer] == NOUN_NUMBER[patch_noun]
        clean_numbers.add(NOUN_NUMBER[noun])
        # the fillers of each template
        if case == "within_rc":
            assert clean[2:4] == ["that", "the"] and clean[1] in NOUN_NUMBER
            assert NOUN_PAIR[clean[1]] != NOUN_PAIR[noun]
        elif case == "across_rc":
            assert clean[2:4] == ["that", "the"] and NOUN_PAIR[clean[4]] != NOUN_PAIR[noun]
            assert INNER_VERB_NUMBER[clean[5]] == NOUN_NUMBER[clean[4]]  # "the managers like"
        elif case == "nounpp":
            assert clean[2] in PREPOSITIONS and clean[3] == "the"
            assert NOUN_PAIR[clean[4]] != NOUN_PAIR[noun]
    assert clean_numbers == {0, 1}, "clean prompts of both numbers"


@pytest.mark.parametrize("case, clean, patch", [
    ("simple", "The author", "The authors"),
    ("within_rc", "The manager that the author", "The manager that the authors"),
    ("across_rc", "The author that the managers like", "The authors that the managers like"),
    ("nounpp", "The author near the managers", "The authors near the managers"),
])
def test_the_papers_examples_are_generated(case, clean, patch):
    expected = PromptPair(clean, patch, " is", " are", case)
    swapped = PromptPair(patch, clean, " are", " is", case)
    pairs = set(agreement_pairs(case))
    assert expected in pairs and swapped in pairs


def test_determinism_and_counts():
    for case in AGREEMENT_CASES:
        assert agreement_pairs(case, 50, seed=7) == agreement_pairs(case, 50, seed=7)
        assert agreement_pairs(case, 50, seed=7) != agreement_pairs(case, 50, seed=8)
    everything = agreement_pairs("simple")
    assert len(everything) == len(set(everything)) == agreement_count("simple")
    assert len(everything) == len(NOUNS) * len(VERBS) * 2
    assert set(everything) == set(agreement_pairs("simple", seed=5))  # seed only orders them
    assert agreement_pairs("nounpp", 0) == []


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="simple.*within_rc.*across_rc.*nounpp.*got 'rc'"):
        agreement_pairs("rc")  # the paper's file name, ambiguous here
    with pytest.raises(ValueError, match="n must be"):
        agreement_pairs("simple", n=agreement_count("simple") + 1)
    with pytest.raises(ValueError, match="n must be"):
        agreement_pairs("simple", n=-1)
    with pytest.raises(ValueError, match="seed must be"):
        agreement_pairs("simple", n=3, seed=1.5)


def test_jsonl_round_trip_in_the_papers_format(tmp_path):
    pairs = [pair for case in AGREEMENT_CASES for pair in agreement_pairs(case, 5)]
    path = tmp_path / "agreement.jsonl"
    save_prompt_pairs(pairs, path)
    assert [p.name for p in tmp_path.iterdir()] == ["agreement.jsonl"]  # no temporary left
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(pairs)
    for line, pair in zip(lines, pairs):
        item = json.loads(line)
        assert set(item) == PAPER_KEYS
        assert (item["clean_prefix"], item["patch_prefix"]) == (pair.clean, pair.patch)
        assert (item["clean_answer"], item["patch_answer"]) == (pair.clean_answer,
                                                                pair.patch_answer)
    assert load_prompt_pairs(path) == pairs
    assert load_prompt_pairs(str(path)) == pairs
    assert load_prompt_pairs([pair.to_json() for pair in pairs]) == pairs
    assert load_prompt_pairs(pairs) == pairs
    # a line as the paper's files write it (their `case` is the nouns' numbers), a blank line
    paper_line = ('{"clean_prefix": "The teachers near the desk", "patch_prefix": "The teacher '
                  'near the desk", "clean_answer": " are", "patch_answer": " is", '
                  '"case": "plural_singular"}')
    path.write_text(paper_line + "\n\n", encoding="utf-8")
    assert load_prompt_pairs(path) == [PromptPair("The teachers near the desk",
                                                  "The teacher near the desk", " are", " is",
                                                  "plural_singular")]


def test_bad_input_names_the_line_the_keys_and_what_came(tmp_path):
    good = json.dumps(PromptPair("The cat", "The cats", " is", " are", "simple").to_json())
    bad_lines = {
        '{"clean_prefix": "The cat", "patch_prefix": "The cats", "clean_answer": " is"}':
            r"line 2 .*clean_prefix.*patch_answer.*missing \['patch_answer'\]",
        '{"clean_prefix": "The cat", "patch_prefix": "The cats", "clean_answer": 5, '
        '"patch_answer": " are"}': r"line 2 .*clean_prefix.*got clean_answer=5",
        '{"clean_prefix": "The cat", "patch_prefix": "The cats", "clean_answer": "", '
        '"patch_answer": " are"}': r"line 2 .*non-empty.*got clean_answer=''",
        '["The cat", "The cats"]': r"line 2 .*clean_prefix.*got list",
        '{"clean_prefix": "The cat",': r"line 2 .*clean_prefix.*invalid JSON",
    }
    path = tmp_path / "bad.jsonl"
    for line, message in bad_lines.items():
        path.write_text(f"{good}\n{line}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            load_prompt_pairs(path)
    with pytest.raises(ValueError, match=r"item 1.*missing \['clean_prefix'"):
        load_prompt_pairs([json.loads(good), {"patch_prefix": "x"}])
    with pytest.raises(ValueError, match="PromptPair.patch_answer must be a non-empty"):
        PromptPair("The cat", "The cats", " is", "")
    with pytest.raises(ValueError, match="list of PromptPair"):
        load_prompt_pairs(json.loads(good))  # one dict, not a list of them
    # a failed save leaves the file as it was
    target = tmp_path / "kept.jsonl"
    target.write_text(good + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="item 1"):
        save_prompt_pairs([json.loads(good), {"clean_prefix": "x"}], target)
    assert target.read_text(encoding="utf-8") == good + "\n"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path())


def test_single_token_pairs_with_a_bpe_tokenizer(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    planted = [
        PromptPair("The cat", "The cats", " supercalifragilistic", " is"),  # multi-token answer
        PromptPair("The cat", "The catamaran", " is", " are"),  # prompts of different lengths
        PromptPair("The cat", "The dog", "s", " are"),  # "The cat"+"s" tokenizes as "The cats"
        PromptPair("The cat", "The dog", " is", " are"),  # usable
    ]
    assert single_token_pairs(planted, tokenizer) == planted[3:]
    for case in AGREEMENT_CASES:
        pairs = agreement_pairs(case, 100, seed=1)
        kept = single_token_pairs(pairs, tokenizer)
        assert len(kept) > 20 and set(kept) <= set(pairs)
        kept_set = set(kept)
        for pair in pairs:
            ids = {name: tokenizer(getattr(pair, name), add_special_tokens=False)["input_ids"]
                   for name in ("clean", "patch", "clean_answer", "patch_answer")}
            usable = (len(ids["clean"]) == len(ids["patch"]) and len(ids["clean_answer"]) == 1
                      and len(ids["patch_answer"]) == 1
                      and tokenizer(pair.clean + pair.clean_answer)["input_ids"]
                      == ids["clean"] + ids["clean_answer"]
                      and tokenizer(pair.patch + pair.patch_answer)["input_ids"]
                      == ids["patch"] + ids["patch_answer"])
            assert (pair in kept_set) == usable, pair


def test_encode_pairs_with_a_bpe_tokenizer(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    kept = single_token_pairs(agreement_pairs("nounpp", 100, seed=2), tokenizer)
    length = len(tokenizer(kept[0].clean)["input_ids"])
    same_length = [pair for pair in kept if len(tokenizer(pair.clean)["input_ids"]) == length]
    encoded = encode_pairs(same_length, tokenizer)
    n = len(same_length)
    assert encoded["clean_ids"].shape == encoded["patch_ids"].shape == (n, length)
    assert encoded["clean_answer_ids"].shape == encoded["patch_answer_ids"].shape == (n,)
    assert all(tensor.dtype == torch.long for tensor in encoded.values())
    for i, pair in enumerate(same_length):
        assert tokenizer.decode(encoded["clean_ids"][i]) == pair.clean
        assert tokenizer.decode(encoded["patch_ids"][i]) == pair.patch
        assert tokenizer.decode(encoded["clean_answer_ids"][i]) == pair.clean_answer
        assert tokenizer.decode(encoded["patch_answer_ids"][i]) == pair.patch_answer
        differing = (encoded["clean_ids"][i] != encoded["patch_ids"][i]).nonzero().flatten()
        assert differing.tolist() == [1]  # "The <noun> ...": only the subject's token
    # a pair of another length ("The <noun>": 2 tokens) is refused, not padded
    other = single_token_pairs(agreement_pairs("simple", 20), tokenizer)[0]
    with pytest.raises(ValueError, match=f"does not pad.*{length} tokens.*pair 1's clean"):
        encode_pairs([same_length[0], other], tokenizer)


@pytest.mark.parametrize("add_bos", [True, False])
def test_byte_tokenizer_of_the_tiny_models(add_bos):
    tokenizer = byte_tokenizer(add_bos=add_bos)  # one token per byte: answers like " is" are 3
    assert single_token_pairs(agreement_pairs("simple", 50), tokenizer) == []
    pairs = [PromptPair("The cat", "The dog", "!", "?"), PromptPair("The owl", "The eel", ".", ",")]
    assert single_token_pairs(pairs, tokenizer) == pairs
    for special in (True, False):
        encoded = encode_pairs(pairs, tokenizer, add_special_tokens=special)
        with_bos = add_bos and special
        assert encoded["clean_ids"].shape == (2, 7 + with_bos)
        assert (encoded["clean_ids"][:, 0] == tokenizer.bos_token_id).all().item() == with_bos
        assert tokenizer.decode(encoded["patch_ids"][1], skip_special_tokens=True) == "The eel"
        assert tokenizer.convert_ids_to_tokens(encoded["clean_answer_ids"].tolist()) == ["!", "."]
    with pytest.raises(ValueError, match="one token, got 3 tokens.*' is'"):
        encode_pairs([PromptPair("The cat", "The dog", " is", " are")], tokenizer)
    with pytest.raises(ValueError, match="does not pad.*pair 0's patch prompt 'The cats'"):
        encode_pairs([PromptPair("The cat", "The cats", "!", "?")], tokenizer)
    with pytest.raises(ValueError, match="at least one pair"):
        encode_pairs([], tokenizer)

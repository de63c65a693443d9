"""Upstream's helpers in `dictionary_learning.utils`: text generators on local data written here,
folder search, the residual-stream submodule and model truncation, each checked against what the
test wrote or computed itself."""

import json
import random
import sys

import pytest
import torch

from dictionary_learning.models import byte_tokenizer, tiny_hf_model
from dictionary_learning.utils import (
    get_nested_folders,
    get_submodule,
    hf_dataset_to_generator,
    hf_mixed_dataset_to_generator,
    hf_sequence_packing_dataset_to_generator,
    randomly_remove_system_prompt,
    simple_hf_mixed_dataset_to_generator,
    truncate_model,
    zst_to_generator,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def texts():
    return [f"text number {i} " + "word " * (i % 5) for i in range(23)]


def test_hf_dataset_to_generator_reads_local_files_and_folders(tmp_path, texts):
    file = write_jsonl(tmp_path / "data.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    assert list(hf_dataset_to_generator(str(file))) == texts
    assert list(hf_dataset_to_generator(str(file), streaming=False)) == texts
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_jsonl(folder / "part.jsonl", [{"text": t} for t in texts[:5]])
    assert list(hf_dataset_to_generator(str(folder))) == texts[:5]
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\nsecond line\n")
    # one row per line, as datasets
    assert list(hf_dataset_to_generator(str(lines))) == ["first line", "second line"]
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(ValueError, match="got .*data.xml"):
        hf_dataset_to_generator(str(tmp_path / "data.xml"))


def test_zst_to_generator(tmp_path, texts, monkeypatch):
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "data.jsonl.zst"
    raw = "".join(json.dumps({"text": t, "meta": {}}) + "\n" for t in texts).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    assert list(zst_to_generator(str(path))) == texts
    with pytest.raises(ValueError, match="no such file"):
        zst_to_generator(tmp_path / "missing.jsonl.zst")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if it were not installed
    with pytest.raises(ImportError, match="zstandard"):
        zst_to_generator(str(path))


def test_randomly_remove_system_prompt():
    text = "<sys>be nice</sys>hello"
    assert randomly_remove_system_prompt(text, 1.0, "<sys>be nice</sys>") == "hello"
    assert randomly_remove_system_prompt(text, 0.0, "<sys>be nice</sys>") == text
    assert randomly_remove_system_prompt(text, 1.0, None) == text
    with pytest.raises(ValueError, match="not found"):
        randomly_remove_system_prompt("hello", 1.0, "<sys>")
    random.seed(0)
    removed = sum(randomly_remove_system_prompt(text, 0.3, "hello") != text for _ in range(4000))
    assert abs(removed / 4000 - 0.3) < 0.03


def test_simple_mixed_generator_interleaves_at_the_fraction(tmp_path):
    main = write_jsonl(tmp_path / "main.jsonl", [{"text": f"A{i}"} for i in range(30)])
    aux = write_jsonl(tmp_path / "aux.jsonl", [{"body": f"B{i}"} for i in range(30)])
    mixed = list(simple_hf_mixed_dataset_to_generator(str(main), str(aux), main_frac=0.75,
                                                      aux_key="body"))
    assert mixed[:8] == ["A0", "A1", "A2", "B0", "A3", "A4", "A5", "B1"]
    assert mixed == [x for i in range(10)
                     for x in (f"A{3 * i}", f"A{3 * i + 1}", f"A{3 * i + 2}", f"B{i}")]
    with pytest.raises(ValueError, match="main_frac"):
        simple_hf_mixed_dataset_to_generator(str(main), str(aux), main_frac=1.0)


def test_sequence_packing(tmp_path):
    rows = ["aaaa", "bbbbbb", "cc", "ddddddddddd", "e"]
    data = write_jsonl(tmp_path / "pre.jsonl", [{"text": r} for r in rows])
    tokenizer = byte_tokenizer()
    packed = list(hf_sequence_packing_dataset_to_generator(tokenizer, str(data), min_chars=8))
    # each pack takes rows until it holds >= 8 characters: 4 + 6, 2 + 11; "e" alone is too short and
    # is dropped
    assert packed == ["<bos>aaaa<eos>bbbbbb", "<bos>cc<eos>ddddddddddd"]
    single = list(hf_sequence_packing_dataset_to_generator(tokenizer, str(data),
                                                           sequence_pack_pretrain=False))
    assert single == ["<bos>" + r for r in rows]
    with pytest.raises(ValueError, match="min_chars"):
        hf_sequence_packing_dataset_to_generator(tokenizer, str(data), min_chars=0)


def test_mixed_pretrain_and_chat(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = ("<bos>{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                               "{% endfor %}")
    pretrain = write_jsonl(tmp_path / "pre.jsonl", [{"text": f"doc{i}"} for i in range(6)])
    chats = [[{"role": "system", "content": "SYS"}, {"role": "user", "content": f"q{i}"}]
             for i in range(6)]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": c} for c in chats])
    mixed = list(hf_mixed_dataset_to_generator(tokenizer, str(pretrain), str(chat),
                                               pretrain_frac=0.5,
                                               system_prompt_to_remove="[system]SYS",
                                               system_prompt_removal_freq=1.0))
    assert mixed == [x for i in range(6) for x in (f"<bos>doc{i}", f"<bos>[user]q{i}")]
    packed = list(hf_mixed_dataset_to_generator(tokenizer, str(pretrain), str(chat), min_chars=20,
                                                pretrain_frac=0.5, sequence_pack_chat=True,
                                                system_prompt_removal_freq=0.0))
    # pretrain packs of >= 20 characters take 5 docs (4 chars each); chats are 20 characters each
    assert packed == ["<bos>" + "<eos>".join(f"doc{i}" for i in range(5)),
                      "<bos>[system]SYS[user]q0"]


def test_get_nested_folders_skips_checkpoints(tmp_path):
    for folder in ("trainer_0", "trainer_1", "trainer_1/checkpoints/step_5", "more/deep", "empty"):
        (tmp_path / folder).mkdir(parents=True)
    for file in ("trainer_0/ae.pt", "trainer_1/ae.pt", "trainer_1/checkpoints/step_5/ae.pt",
                 "trainer_1/checkpoints/ae_5.pt", "more/deep/ae.pt", "empty/config.json"):
        (tmp_path / file).write_bytes(b"")
    assert get_nested_folders(tmp_path) == [str(tmp_path / f)
                                            for f in ("more/deep", "trainer_0", "trainer_1")]
    (tmp_path / "ae.pt").write_bytes(b"")
    assert get_nested_folders(str(tmp_path))[0] == str(tmp_path)


def test_get_submodule_is_the_residual_block(tiny_llama, tiny_gpt2):
    assert get_submodule(tiny_llama, 2) is tiny_llama.model.layers[2]
    assert get_submodule(tiny_gpt2, 0) is tiny_gpt2.transformer.h[0]
    hf_model, _ = tiny_hf_model("tiny-llama")
    assert get_submodule(hf_model, 3) is hf_model.model.layers[3]
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 3\]"):
        get_submodule(tiny_llama, 4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_truncate_model_keeps_the_layers_up_to_layer(name, capsys, tiny_llama):
    model, _ = tiny_hf_model(name)
    blocks, final_norm = (model.model.layers, model.model.norm) if name == "tiny-llama" else \
        (model.transformer.h, model.transformer.ln_f)
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    seen = {}
    handle = blocks[1].register_forward_hook(
        lambda m, args, out: seen.update(x=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    # what the truncated model returns: block 1's output through the final norm
    expected = final_norm(seen["x"])
    n_before = sum(p.numel() for p in model.parameters())
    assert truncate_model(model, 1) is model
    layers = model.model.layers if name == "tiny-llama" else model.transformer.h
    assert len(layers) == 2 and isinstance(model.lm_head, torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
    printed = capsys.readouterr().out
    assert f"before truncation: {n_before:,}" in printed
    assert f"after truncation: {sum(p.numel() for p in model.parameters()):,}" in printed
    with pytest.raises(TypeError, match="before wrapping"):
        truncate_model(tiny_llama, 1)

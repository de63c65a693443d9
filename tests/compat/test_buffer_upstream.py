"""Upstream dictionary_learning's buffers (0.1.0, GitHub HEAD, the founding README of December 2023)
against plain PyTorch forward hooks: their constructor arguments, API and meaning,
HeadActivationBuffer, NNsightActivationBuffer, and the tiny GPT-NeoX model that stands in for
pythia-70m-deduped."""

import inspect
import json

import pytest
import torch

from dictionary_learning import load_model
from dictionary_learning.buffer import (
    ActivationBuffer,
    HeadActivationBuffer,
    NNsightActivationBuffer,
)
from dictionary_learning.models import HookPoint

from ..helpers import assert_same_rows, hook_reference, random_texts

CTX = 32
NEOX_CTX = 16  # tiny-gptneox is pythia-70m wide: short contexts keep its tests fast
README_TEXTS = ["This is some example data", "In real life, for training a dictionary",
                "you would need much more data than this"]


@pytest.fixture(scope="module")
def gptneox():
    return load_model("tiny-gptneox")


def drain(buffer):
    batches = list(buffer)
    if isinstance(batches[0], tuple):
        return tuple(torch.cat(side) for side in zip(*batches))
    return torch.cat(batches)


class _Stop(Exception):
    pass


def forward_hook_rows(hf_model, module, id_lists):
    """(inputs, outputs) `[n_tokens, ...]`: a module's first input and its output recorded by plain
    PyTorch hooks, each token-id list run alone (no padding, natural positions) and stopped after
    the module; rows concatenated."""
    inputs, outputs = [], []

    def first(value):
        while isinstance(value, (tuple, list)):
            value = value[0]
        return value.detach()[0]

    def on_output(module, args, output):
        outputs.append(first(output))
        raise _Stop

    handles = [module.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(
                   first(args if args else next(iter(kwargs.values())))), with_kwargs=True),
               module.register_forward_hook(on_output)]
    try:
        with torch.no_grad():
            for ids in id_lists:
                try:
                    hf_model(torch.as_tensor(ids)[None])
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(inputs), torch.cat(outputs)


def parameters(function):
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()
            if p.name != "self"]


E = inspect.Parameter.empty
UPSTREAM_ACTIVATION_BUFFER = [  # GitHub HEAD 60ec6bf (0.1.0 is this without the last two)
    ("data", E), ("model", E), ("submodule", E), ("d_submodule", None), ("io", "out"),
    ("n_ctxs", 3e4), ("ctx_len", 128), ("refresh_batch_size", 512), ("out_batch_size", 8192),
    ("device", "cpu"), ("remove_bos", False), ("add_special_tokens", True),
    ("max_activation_norm_multiple", None)]
UPSTREAM_HEAD_BUFFER = [
    ("data", E), ("model", E), ("layer", E), ("n_ctxs", 3e4), ("ctx_len", 128),
    ("refresh_batch_size", 512), ("out_batch_size", 8192), ("device", "cpu"), ("apply_W_O", False),
    ("remote", False)]
UPSTREAM_NNSIGHT_BUFFER = UPSTREAM_ACTIVATION_BUFFER[:10]


def test_signatures_are_upstreams():
    """Upstream's arguments in upstream's positional order with upstream's defaults; the founding
    README's in_feats / out_feats / in_batch_size by keyword; upstream's methods and attributes."""
    assert parameters(ActivationBuffer)[:13] == UPSTREAM_ACTIVATION_BUFFER
    founding = {name: default for name, default in parameters(ActivationBuffer)}
    assert (founding["in_feats"] is None and founding["out_feats"] is None
            and founding["in_batch_size"] is None)
    assert parameters(HeadActivationBuffer)[:10] == UPSTREAM_HEAD_BUFFER
    assert parameters(NNsightActivationBuffer)[:10] == UPSTREAM_NNSIGHT_BUFFER
    for cls in (ActivationBuffer, HeadActivationBuffer, NNsightActivationBuffer):
        for name in ("text_batch", "tokenized_batch", "refresh", "config", "close", "activations",
                     "read"):
            assert hasattr(cls, name), f"{cls.__name__}.{name}"
    assert hasattr(NNsightActivationBuffer, "token_batch")


def test_founding_readme_example_runs(gptneox):
    """The founding README's training example as written, with the model (and device) swapped."""
    from dictionary_learning.buffer import ActivationBuffer
    from dictionary_learning.training import trainSAE

    model = gptneox  # was LanguageModel('EleutherAI/pythia-70m-deduped', device_map='cuda:0')
    submodule = model.gpt_neox.layers[1].mlp  # layer 1 MLP
    activation_dim = 512  # output dimension of the MLP
    dictionary_size = 16 * activation_dim
    data = iter(README_TEXTS)
    buffer = ActivationBuffer(
        data,
        model,
        submodule,
        out_feats=activation_dim,  # output dimension of the model component
    )
    ae = trainSAE(buffer, activation_dim, dictionary_size, lr=3e-4, sparsity_penalty=1e-3,
                  device="cpu")
    features = ae.encode(torch.randn(4, activation_dim))
    assert (features.shape == (4, dictionary_size)
            and ae.decode(features).shape == (4, activation_dim))
    with pytest.raises(StopIteration):
        next(buffer)


def test_pythia_paths_read_what_plain_hooks_read(gptneox):
    """`model.gpt_neox.layers[1].mlp` through the buffer equals a plain PyTorch forward hook on the
    same module: its output (io="out"), and its input and output aligned (the founding
    io="in_to_out" with in_feats / out_feats); upstream's end-to-end form (`layers[3]`,
    d_submodule=model.config.hidden_size) reads the block's output."""
    texts = random_texts(5, seed=11, max_words=6)  # some shorter than NEOX_CTX: padded batches
    mlp = gptneox._module.gpt_neox.layers[1].mlp
    ids = [gptneox.tokenizer(t, truncation=True, max_length=NEOX_CTX)["input_ids"] for t in texts]
    expected_in, expected_out = forward_hook_rows(gptneox._module, mlp, ids)
    options = dict(n_ctxs=2, ctx_len=NEOX_CTX, refresh_batch_size=2, out_batch_size=40)
    got = drain(ActivationBuffer(iter(texts), gptneox, gptneox.gpt_neox.layers[1].mlp,
                                 out_feats=512, **options))
    assert_same_rows(got, expected_out)
    x_in, x_out = drain(ActivationBuffer(iter(texts), gptneox, gptneox.gpt_neox.layers[1].mlp,
                                         in_feats=512, out_feats=512, io="in_to_out",
                                         in_batch_size=2, n_ctxs=2, ctx_len=NEOX_CTX))
    assert_same_rows(torch.cat([x_in, x_out], -1), torch.cat([expected_in, expected_out], -1))
    block = drain(ActivationBuffer(iter(texts), gptneox, gptneox.gpt_neox.layers[3], io="out",
                                   d_submodule=gptneox.config.hidden_size, device="cpu", **options))
    assert_same_rows(block,
                     forward_hook_rows(gptneox._module, gptneox._module.gpt_neox.layers[3], ids)[1])


def test_tiny_gptneox_is_pythia_shaped_and_seeded():
    model = load_model("tiny-gptneox")
    config = model._module.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size) == \
           (512, 6, 8, 2048)
    assert config.use_parallel_residual and config.rope_parameters["partial_rotary_factor"] == 0.25
    norm = model._module.gpt_neox.layers[0].input_layernorm
    assert norm.weight.std() > 0.05 and norm.bias.abs().mean() > 0.01  # a non-trivial LayerNorm
    again, other = load_model("tiny-gptneox"), load_model("tiny-gptneox", seed=1)
    w = [m._module.gpt_neox.layers[0].mlp.dense_h_to_4h.weight for m in (model, again, other)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_add_special_tokens(tiny_llama):
    """add_special_tokens=False: the texts run without the BOS the tokenizer would add."""
    texts = random_texts(5, seed=12, max_words=8)
    point = HookPoint("model.layers.1", "output")
    ids = [tiny_llama.tokenizer(t, truncation=True, max_length=CTX,
                                add_special_tokens=False)["input_ids"]
           for t in texts]
    assert all(i[0] != tiny_llama.tokenizer.bos_token_id for i in ids)
    got = drain(ActivationBuffer(texts, tiny_llama, point, n_ctxs=100, ctx_len=CTX,
                                 refresh_batch_size=2, add_special_tokens=False))
    assert_same_rows(got, forward_hook_rows(tiny_llama._module, tiny_llama._module.model.layers[1],
                                            ids)[1])


def test_max_activation_norm_multiple(tiny_gpt2):
    """Tokens whose norm exceeds the multiple of the batch's median norm are dropped, the others
    kept."""
    texts = random_texts(6, seed=13, max_words=10)
    point = HookPoint("transformer.h.2", "output")
    reference = hook_reference(tiny_gpt2, texts, [point], CTX)[0]
    norms = reference.norm(dim=-1)
    ordered = norms.sort().values
    lo, hi = int(0.6 * len(ordered)), int(0.9 * len(ordered))
    # a threshold in the widest gap
    i = lo + int((ordered[lo + 1 : hi + 1] - ordered[lo:hi]).argmax())
    multiple = float((ordered[i] + ordered[i + 1]) / 2 / norms.median())
    got = drain(ActivationBuffer(texts, tiny_gpt2, point, n_ctxs=100, ctx_len=CTX,
                                 refresh_batch_size=6, max_activation_norm_multiple=multiple))
    assert_same_rows(got, reference[norms <= norms.median() * multiple])
    assert 0 < got.shape[0] < reference.shape[0]


def test_upstream_api(tiny_gpt2):
    """activations / read / refresh / text_batch / tokenized_batch / config / close behave as
    upstream's."""
    closed = []

    def texts():
        try:
            yield from random_texts(40, seed=14, min_words=10)
        finally:
            closed.append(True)

    buffer = ActivationBuffer(texts(), tiny_gpt2, "transformer.h.1", n_ctxs=4, ctx_len=CTX,
                              refresh_batch_size=3, out_batch_size=30)
    assert buffer.activations.shape == (0, 48) and buffer.read.shape == (0,)
    assert buffer.activation_buffer_size == 4 * CTX
    batch = next(buffer)
    held, read = buffer.activations, buffer.read
    assert read.shape == (held.shape[0],) and int(read.sum()) == 30
    assert_same_rows(held[read], batch, atol=1e-6)
    unread = held[~read]
    buffer.refresh()  # keeps the unread vectors, refills, and nothing is read
    assert not buffer.read.any() and buffer.activations.shape[0] >= buffer.activation_buffer_size
    distances = torch.cdist(unread, buffer.activations, compute_mode="donot_use_mm_for_euclid_dist")
    assert (distances.min(dim=1).values == 0).all()
    assert len(buffer.text_batch(2)) == 2
    tokens = buffer.tokenized_batch(2)
    assert tokens["input_ids"].shape[0] == 2 and tokens["input_ids"].shape[1] <= CTX
    config = json.loads(json.dumps(buffer.config))
    assert {"d_submodule": 48, "io": "out", "n_ctxs": 4, "ctx_len": CTX, "refresh_batch_size": 3,
            "out_batch_size": 30, "device": "cpu"}.items() <= config.items()
    buffer.close()
    assert closed and buffer.activations.shape[0] == 0
    with pytest.raises(StopIteration):
        next(buffer)
    with ActivationBuffer(texts(), tiny_gpt2, "transformer.h.1", n_ctxs=4, ctx_len=CTX) as scoped:
        next(scoped)
    assert len(closed) == 2


def test_founding_arguments_are_checked(tiny_gpt2):
    options = dict(data=["some text"], model=tiny_gpt2, submodule="transformer.h.1.mlp", n_ctxs=4,
                   ctx_len=CTX)
    with pytest.raises(ValueError, match="out_feats=47 does not match the model: .* has width 48"):
        ActivationBuffer(**options, out_feats=47)
    with pytest.raises(ValueError, match=r"in_feats=40, out_feats=48 .* width \(48, 48\)"):
        ActivationBuffer(**options, io="in_to_out", in_feats=40, out_feats=48)
    with pytest.raises(ValueError, match="in_batch_size=8 and refresh_batch_size=16"):
        ActivationBuffer(**options, in_batch_size=8, refresh_batch_size=16)
    buffer = ActivationBuffer(**options, io="in_to_out", in_feats=48, in_batch_size=8)
    assert buffer.refresh_batch_size == 8 and buffer.d_submodule == (48, 48)
    next(buffer)
    assert (buffer.activations_in.shape == buffer.activations_out.shape
            == (buffer.activations[0].shape[0], 48))
    with pytest.raises(ValueError, match="max_activation_norm_multiple"):
        ActivationBuffer(**options, max_activation_norm_multiple=0)


@pytest.mark.parametrize("name,projection", [("tiny-llama", "model.layers.1.self_attn.o_proj"),
                                             ("tiny-gpt2", "transformer.h.1.attn.c_proj")])
def test_head_buffer(name, projection, request):
    """Per-head rows are the output projection's input split into heads; with apply_W_O each head's
    slice goes through its slice of the projection (plus the bias), and the heads' terms sum to the
    attention output."""
    model = request.getfixturevalue(name.replace("-", "_"))
    texts = random_texts(5, seed=15, max_words=8)
    options = dict(n_ctxs=100, ctx_len=CTX, refresh_batch_size=2, seed=3)
    heads = drain(HeadActivationBuffer(iter(texts), model, 1, **options))
    _, n_heads, head_dim = heads.shape
    assert (n_heads, head_dim) == ((4, 16) if name == "tiny-llama" else (4, 12))
    reference = hook_reference(model, texts, [HookPoint(projection, "input"),
                                              HookPoint(projection, "output")], CTX)
    assert_same_rows(heads.flatten(1), reference[0])
    # same seed: same order
    per_head = drain(HeadActivationBuffer(iter(texts), model, 1, apply_W_O=True, **options))
    module = model._module.get_submodule(projection)
    weight = module.weight.T if name == "tiny-gpt2" else module.weight  # Conv1D stores [in, out]
    bias = module.bias if module.bias is not None else torch.zeros(weight.shape[0])
    for h in range(n_heads):
        expected = heads[:, h] @ weight[:, h * head_dim : (h + 1) * head_dim].T + bias
        torch.testing.assert_close(per_head[:, h], expected.detach(), atol=1e-5, rtol=1e-5)
    assert_same_rows(per_head.sum(1) - (n_heads - 1) * bias.detach(), reference[1])
    with pytest.raises(NotImplementedError, match="remote"):
        HeadActivationBuffer(iter(texts), model, 1, remote=True)
    with pytest.raises(ValueError, match="layer must be an int"):
        HeadActivationBuffer(iter(texts), model, 9)


def test_nnsight_buffer_on_token_ids(gptneox):
    """Token-id data run as they are, every position kept; ragged lengths are padded and the padding
    dropped; io="in_and_out" stacks a module's input and output."""
    generator = torch.Generator().manual_seed(16)
    equal = [torch.randint(3, 259, (12,), generator=generator).tolist() for _ in range(5)]
    ragged = [torch.randint(3, 259, (length,), generator=generator).tolist()
              for length in (3, 9, 14, 5)]
    mlp = gptneox._module.gpt_neox.layers[1].mlp
    for data in (equal, ragged):
        got = drain(NNsightActivationBuffer(iter(data), gptneox, gptneox.gpt_neox.layers[1].mlp,
                                            n_ctxs=2, ctx_len=16, refresh_batch_size=2,
                                            out_batch_size=10))
        assert_same_rows(got, forward_hook_rows(gptneox._module, mlp, data)[1])
    buffer = NNsightActivationBuffer(iter(equal), gptneox, gptneox.gpt_neox.layers[1].mlp,
                                     io="in_and_out", n_ctxs=2, ctx_len=16, refresh_batch_size=2)
    assert buffer.d_submodule == 512 and buffer.token_batch(2).shape == (2, 12)
    pairs = drain(buffer)
    assert pairs.shape == (3 * 12, 2, 512)
    expected = torch.stack(forward_hook_rows(gptneox._module, mlp, equal[2:]), dim=1)
    assert_same_rows(pairs.flatten(1), expected.flatten(1))
    with pytest.raises(TypeError, match="token-id sequences"):
        NNsightActivationBuffer(iter(["text"]), gptneox, "gpt_neox.layers.1.mlp")
    with pytest.raises(ValueError, match="io must be one of"):
        NNsightActivationBuffer(iter(equal), gptneox, "gpt_neox.layers.1.mlp", io="in_to_out")


UPSTREAM_BUFFER_SCRIPT = """
import itertools, sys
from pathlib import Path

import torch
from nnsight import LanguageModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from dictionary_learning.buffer import ActivationBuffer

folder = Path(sys.argv[1])
tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "model" / "tokenizer.json"),
                                    bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                    padding_side="left")
model = LanguageModel(AutoModelForCausalLM.from_pretrained(folder / "model"), tokenizer=tokenizer)
texts = %r
out = {}
for io in ("out", "in"):
    buffer = ActivationBuffer(itertools.cycle(texts), model, model.gpt_neox.layers[1].mlp,
                              d_submodule=512, io=io, n_ctxs=1, ctx_len=%d,
                              refresh_batch_size=len(texts))
    buffer.activation_buffer_size = %d  # exactly one pass over the texts
    buffer.refresh()
    out[io] = buffer.activations.clone()
torch.save(out, folder / "upstream_activations.pt")
"""


@pytest.mark.peers
def test_upstream_buffer_reads_the_same_vectors(gptneox, tmp_path):
    """Upstream 0.1.0's own ActivationBuffer (nnsight 0.3.7, in its own venv; skipped when absent)
    and this one serve the same vectors of `gpt_neox.layers[1].mlp` on the same model and texts, at
    its output and input."""
    from .test_upstream_files import upstream

    texts = README_TEXTS + ["x"]
    n_tokens = sum(len(gptneox.tokenizer(t, truncation=True, max_length=NEOX_CTX)["input_ids"])
                   for t in texts)
    gptneox._module.save_pretrained(tmp_path / "model")
    gptneox.tokenizer.save_pretrained(tmp_path / "model")
    upstream(UPSTREAM_BUFFER_SCRIPT % (texts, NEOX_CTX, n_tokens), tmp_path)
    theirs = torch.load(tmp_path / "upstream_activations.pt")
    for io in ("out", "in"):
        ours = drain(ActivationBuffer(iter(texts), gptneox, gptneox.gpt_neox.layers[1].mlp, 512, io,
                                      n_ctxs=1, ctx_len=NEOX_CTX, refresh_batch_size=len(texts)))
        assert_same_rows(ours, theirs[io])

"""ActivationBuffer against plain PyTorch forward hooks on unpadded single-text forwards."""

import json

import pytest
import torch

from dictionary_learning import ActivationBuffer, hook
from dictionary_learning.models import HookPoint

from ..helpers import assert_same_rows, hook_reference, random_texts

CTX = 32


def drain(buffer):
    batches = list(buffer)
    if isinstance(batches[0], tuple):
        return tuple(torch.cat(side) for side in zip(*batches))
    return torch.cat(batches)


@pytest.mark.parametrize("io,sites", [("out", ["resid"]), ("out", ["attn_out"]), ("in", ["mlp_in"]),
                                      ("out", ["mlp_out"]), ("in_to_out", ["mlp_in", "mlp_out"])])
def test_buffer_matches_forward_hooks(tiny_model, io, sites):
    texts = random_texts(24, seed=1)
    points = [hook(tiny_model, 1, site) for site in sites]
    submodule = tuple(points) if len(points) > 1 else points[0]
    buffer = ActivationBuffer(texts, tiny_model, submodule, io=io, n_ctxs=6, ctx_len=CTX,
                              refresh_batch_size=5, out_batch_size=37)
    got = drain(buffer)
    expected = hook_reference(tiny_model, texts, points, CTX)
    if io == "in_to_out":  # pairs must stay aligned: match on the concatenation
        assert (got[0].shape[-1] == expected[0].shape[-1]
                and got[1].shape[-1] == expected[1].shape[-1])
        assert_same_rows(torch.cat(got, dim=-1), torch.cat(expected, dim=-1))
    else:
        assert_same_rows(got, expected[0])


def test_module_input_output_and_different_widths(tiny_llama):
    """in_to_out from two different submodules of different widths; a bare module gives its input
    and output."""
    texts = random_texts(10, seed=2)
    up = tiny_llama.model.layers[2].mlp.up_proj  # an nnsight Envoy: 64 -> 128
    buffer = ActivationBuffer(texts, tiny_llama, (hook(tiny_llama, 2, "mlp_in"), up),
                              io="in_to_out", d_submodule=(64, 128), n_ctxs=4, ctx_len=CTX,
                              refresh_batch_size=3, out_batch_size=50)
    x_in, x_out = drain(buffer)
    assert x_in.shape[1] == 64 and x_out.shape[1] == 128
    reference = hook_reference(tiny_llama, texts,
                               [HookPoint("model.layers.2.mlp.up_proj", "output"),
                                HookPoint("model.layers.2.mlp", "input")], CTX)
    assert_same_rows(torch.cat([x_in, x_out], -1), torch.cat([reference[1], reference[0]], -1))
    # a torch module as submodule with in_to_out: its own input and output
    module = tiny_llama._module.model.layers[2].mlp
    x_in2, x_out2 = drain(ActivationBuffer(texts, tiny_llama, module, io="in_to_out", n_ctxs=4,
                                           ctx_len=CTX, refresh_batch_size=3, out_batch_size=50))
    reference = hook_reference(tiny_llama, texts, [HookPoint("model.layers.2.mlp", "input"),
                                                   HookPoint("model.layers.2.mlp", "output")], CTX)
    assert_same_rows(torch.cat([x_in2, x_out2], -1), torch.cat(reference, -1))


def test_submodule_forms_agree(tiny_gpt2):
    """Dotted path, Envoy, torch module and HookPoint name the same activations."""
    texts = random_texts(6, seed=3)
    forms = ["transformer.h.2.mlp", tiny_gpt2.transformer.h[2].mlp,
             tiny_gpt2._module.transformer.h[2].mlp, hook(tiny_gpt2, 2, "mlp_out"),
             "layers.2.mlp_out"]
    results = [drain(ActivationBuffer(texts, tiny_gpt2, form, n_ctxs=100, ctx_len=CTX, seed=5))
               for form in forms]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0])


def test_remove_bos(tiny_model):
    """remove_bos drops each context's first token: tiny-llama's BOS, tiny-gpt2's first real
    token."""
    texts = random_texts(8, seed=4)
    point = hook(tiny_model, 0, "resid")
    got = drain(ActivationBuffer(texts, tiny_model, point, n_ctxs=100, ctx_len=CTX, remove_bos=True,
                                 refresh_batch_size=3))
    assert_same_rows(got, hook_reference(tiny_model, texts, [point], CTX, drop_first=True)[0])
    n_tokens = sum(len(tiny_model.tokenizer(t, truncation=True, max_length=CTX)["input_ids"])
                   for t in texts)
    assert got.shape[0] == n_tokens - len(texts)


def test_no_padding_vectors(tiny_gpt2):
    """Very unequal lengths in one refresh batch: the row count is exactly the number of real
    tokens."""
    texts = ["x", "a much longer text that is padded against " * 3, "yz", "q"]
    got = drain(ActivationBuffer(texts, tiny_gpt2, hook(tiny_gpt2, 3, "resid"), n_ctxs=100,
                                 ctx_len=CTX, refresh_batch_size=4))
    n_tokens = sum(len(tiny_gpt2.tokenizer(t, truncation=True, max_length=CTX)["input_ids"])
                   for t in texts)
    assert got.shape[0] == n_tokens


def test_refresh_when_half_drained_and_shuffled(tiny_llama):
    texts = random_texts(400, seed=5, min_words=20)
    buffer = ActivationBuffer(iter(texts), tiny_llama, hook(tiny_llama, 1, "resid"), n_ctxs=8,
                              ctx_len=CTX, refresh_batch_size=4, out_batch_size=40)
    capacity = buffer.capacity
    assert buffer.n_unread == 0
    first = next(buffer)
    assert buffer.n_unread + 40 >= capacity
    refreshes = 0
    for _ in range(30):
        before = buffer.n_unread
        next(buffer)
        if before < capacity // 2:
            refreshes += 1
            assert buffer.n_unread + 40 >= capacity, "a refresh must refill to capacity"
        else:
            assert buffer.n_unread == before - 40, "no refresh while at least half is unread"
    assert refreshes >= 2
    # shuffled across contexts: the first batch draws on many of the 8+ contexts, not one contiguous
    # run
    reference = hook_reference(tiny_llama, texts[:12], [hook(tiny_llama, 1, "resid")], CTX)[0]
    lengths = [len(tiny_llama.tokenizer(t, truncation=True, max_length=CTX)["input_ids"])
               for t in texts[:12]]
    context_of_row = torch.repeat_interleave(torch.arange(12), torch.tensor(lengths))
    nearest = torch.cdist(first.double(), reference.double()).argmin(dim=1)
    assert len(set(context_of_row[nearest].tolist())) >= 6


def test_exhaustion_is_clean(tiny_gpt2):
    texts = random_texts(9, seed=6)
    buffer = ActivationBuffer((t for t in texts), tiny_gpt2, hook(tiny_gpt2, 0, "mlp_out"),
                              n_ctxs=2, ctx_len=CTX, refresh_batch_size=2, out_batch_size=16)
    total = sum(b.shape[0] for b in buffer)
    assert total == sum(len(tiny_gpt2.tokenizer(t, truncation=True, max_length=CTX)["input_ids"])
                        for t in texts)
    with pytest.raises(StopIteration):
        next(buffer)
    with pytest.raises(StopIteration):
        next(buffer)


def test_dtype_and_config(tiny_llama):
    buffer = ActivationBuffer(random_texts(4), tiny_llama, hook(tiny_llama, 1, "mlp_out"),
                              n_ctxs=10, ctx_len=CTX, dtype=torch.bfloat16)
    batch = next(buffer)
    assert batch.dtype == torch.bfloat16
    config = json.loads(json.dumps(buffer.config))
    assert config["d_submodule"] == 64 and config["io"] == "out" and config["dtype"] == "bfloat16"
    assert config["hooks"] == [{"path": "model.layers.1.mlp", "io": "output",
                                "name": "layers.1.mlp_out"}]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(submodule="model.layers.9.mlp"), ValueError, "valid paths include"),
    (dict(submodule="model.layers.1.mpl"), ValueError, "model.layers.1.mlp"),
    (dict(submodule="layers.1.mlp_inn"), ValueError, "model.layers"),
    (dict(d_submodule=65), ValueError, "width 64"),
    (dict(d_submodule=(64, 32), io="in_to_out"), ValueError, r"width \(64, 64\)"),
    (dict(data=[]), ValueError, "no text"),
    (dict(data=[1, 2]), TypeError, "strings"),
    (dict(ctx_len=1000), ValueError, "maximum context of 256"),
    (dict(io="both"), ValueError, "io must be one of"),
    (dict(submodule=("model.layers.1.mlp", "model.layers.1.mlp")), ValueError, "in_to_out"),
    (dict(n_ctxs=0), ValueError, "n_ctxs"),
    (dict(submodule=3), TypeError, "submodule must be"),
])
def test_bad_input(tiny_llama, kwargs, error, match):
    arguments = dict(data=["some text"], model=tiny_llama, submodule="model.layers.1.mlp", n_ctxs=4,
                     ctx_len=CTX)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        ActivationBuffer(**arguments)


@pytest.mark.slow
def test_smollm2_buffer_matches_forward_hooks(smollm2):
    import itertools

    from dictionary_learning import default_corpus

    texts = list(itertools.islice(default_corpus(), 6))
    points = (hook(smollm2, 5, "mlp_in"), hook(smollm2, 5, "mlp_out"))
    got = drain(ActivationBuffer(texts, smollm2, points, io="in_to_out", n_ctxs=2, ctx_len=64,
                                 refresh_batch_size=3, out_batch_size=100))
    expected = hook_reference(smollm2, texts, points, 64)
    assert_same_rows(torch.cat(got, -1), torch.cat(expected, -1))


def test_read_values_are_freed_when_dropped(tiny_llama):
    """Nothing but the caller holds what read_hook_points returns: once dropped, the tensors are
    freed at once, not left to reference cycles of the finished trace (which let a many-hook buffer
    grow by gigabytes per refill)."""
    import weakref

    from dictionary_learning.tracing import read_hook_points, tokenize

    encoding = tokenize(tiny_llama.tokenizer, random_texts(4, seed=5), 16)
    values = read_hook_points(tiny_llama, encoding,
                              [hook(tiny_llama, 1, "resid"), hook(tiny_llama, 2, "mlp_in")])
    references = [weakref.ref(v) for v in values]
    del values
    assert all(reference() is None for reference in references)


def test_take_reads_only_the_texts_it_needs_and_keeps_the_surplus(tiny_gpt2):
    # take(n) reads refresh batches until n vectors are in hand (no buffer refill beyond them): the
    # texts pulled are at most those holding n tokens plus one refresh batch; the surplus of the
    # last batch is served next, and take's vectors plus what follows are exactly the PyTorch hook
    # reference of the texts read, in some order
    texts = random_texts(400, seed=5, min_words=10, max_words=20)
    pulled = []

    def source():
        for text in texts:
            pulled.append(text)
            yield text

    point = hook(tiny_gpt2, 1, "resid")
    buffer = ActivationBuffer(source(), tiny_gpt2, point, n_ctxs=64, ctx_len=16,
                              refresh_batch_size=8, out_batch_size=32, device="cpu")
    taken = buffer.take(3000)  # about 3x what the buffer holds (64 x 16 tokens)
    assert taken.shape[0] == 3000
    reference = hook_reference(tiny_gpt2, pulled, [point], 16)[0]
    counts = [hook_reference(tiny_gpt2, [text], [point], 16)[0].shape[0] for text in pulled]
    needed = next(i for i in range(1, len(counts) + 1) if sum(counts[:i]) >= 3000)
    assert len(pulled) <= needed + 8  # one refresh batch at most beyond (a refill: ~64 texts)
    rest = buffer.take(reference.shape[0] - 3000)
    assert_same_rows(torch.cat([taken, rest]), reference)


@pytest.mark.parametrize("remove_bos", [False, True])
def test_filter_counts_what_it_drops(tiny_gpt2, remove_bos):
    """The norm filter's counts against plain forward hooks: the tokens above 1.1 x the batch's
    median norm, how many sit first in their context, and their share of the squared norm."""
    texts = random_texts(6, seed=21)
    point = hook(tiny_gpt2, 1, "resid")
    buffer = ActivationBuffer(texts, tiny_gpt2, point, n_ctxs=100, ctx_len=CTX,
                              refresh_batch_size=len(texts), remove_bos=remove_bos,
                              max_activation_norm_multiple=1.1)
    got = drain(buffer)
    [rows] = hook_reference(tiny_gpt2, texts, [point], CTX)
    norms = rows.float().norm(dim=-1)
    lengths = [len(tiny_gpt2.tokenizer(t, truncation=True, max_length=CTX)["input_ids"])
               for t in texts]
    first = torch.zeros(len(norms), dtype=torch.bool)
    first[torch.tensor([0, *lengths[:-1]]).cumsum(0)] = True
    candidates = ~first if remove_bos else torch.ones_like(first)
    outlier = candidates & (norms > 1.1 * norms[candidates].median())
    counts = buffer.config["filtered"]
    assert counts["tokens_seen"] == len(norms) == sum(lengths)
    assert counts["first_tokens_dropped"] == (len(texts) if remove_bos else 0)
    assert counts["outliers_dropped"] == int(outlier.sum()) > 0
    assert counts["outliers_at_first_position"] == int((outlier & first).sum())
    squares = norms.double().square()
    assert counts["outliers_square_norm_share"] == pytest.approx(  # of the tokens the filter saw
        float(squares[outlier].sum() / squares[candidates].sum()), rel=1e-4)
    assert counts["first_tokens_square_norm_share"] == pytest.approx(
        float(squares[first].sum() / squares.sum()) if remove_bos else 0.0, rel=1e-4)
    assert got.shape[0] == len(norms) - counts["outliers_dropped"] - counts["first_tokens_dropped"]

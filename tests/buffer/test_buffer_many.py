"""ActivationBuffer over many hook points from one model pass (a dict submodule): rows aligned
across hook points (checked against plain PyTorch forward hooks), and equal to one buffer per hook
point on the same tokens."""

import pytest
import torch

from dictionary_learning import ActivationBuffer, hook
from dictionary_learning.models import HookPoint

from ..helpers import assert_same_rows, hook_reference, random_texts

CTX = 24


def suite_points(model, layers):
    points = {}
    for layer in layers:
        points[f"attn_{layer}"] = hook(model, layer, "attn_out")
        points[f"mlp_{layer}"] = (hook(model, layer, "mlp_in"), hook(model, layer, "mlp_out"))
    return points


def drain(buffer):
    batches = list(buffer)
    return {name: (tuple(torch.cat([b[name][s] for b in batches]) for s in range(2))
                   if isinstance(batches[0][name], tuple)
                   else torch.cat([b[name] for b in batches]))
            for name in batches[0]}


def test_rows_aligned_with_forward_hooks(tiny_model):
    """Every row of every entry comes from the same token: the concatenation of all entries matches
    the concatenation of the hook reference's rows, token by token."""
    texts = random_texts(16, seed=3)
    points = suite_points(tiny_model, [0, 1])
    points["resid_1"] = hook(tiny_model, 1, "resid")
    buffer = ActivationBuffer(texts, tiny_model, points, n_ctxs=5, ctx_len=CTX,
                              refresh_batch_size=4, out_batch_size=29)
    assert buffer.entry_names == ["attn_0", "mlp_0", "attn_1", "mlp_1", "resid_1"]
    got = drain(buffer)
    assert isinstance(got["mlp_0"], tuple) and not isinstance(got["attn_0"], tuple)
    order = [hook(tiny_model, 0, "attn_out"), hook(tiny_model, 0, "mlp_in"),
             hook(tiny_model, 0, "mlp_out"), hook(tiny_model, 1, "attn_out"),
             hook(tiny_model, 1, "mlp_in"), hook(tiny_model, 1, "mlp_out"),
             hook(tiny_model, 1, "resid")]
    reference = hook_reference(tiny_model, texts, order, CTX)
    flat = [got["attn_0"], *got["mlp_0"], got["attn_1"], *got["mlp_1"], got["resid_1"]]
    assert_same_rows(torch.cat(flat, -1), torch.cat(reference, -1))
    d = reference[0].shape[-1]
    assert buffer.d_submodule == {"attn_0": d, "mlp_0": (d, d), "attn_1": d, "mlp_1": (d, d),
                                  "resid_1": d}
    assert set(buffer.config["submodule"]) == set(points)


def test_equals_one_buffer_per_hook_point(tiny_llama):
    """Same texts, same seed: each entry's batches equal (exactly) those of a buffer reading only
    that entry."""
    texts = random_texts(20, seed=4)
    points = suite_points(tiny_llama, [0, 2])
    options = dict(n_ctxs=6, ctx_len=CTX, refresh_batch_size=5, out_batch_size=33, seed=7)
    together = list(ActivationBuffer(texts, tiny_llama, points, **options))
    for name, point in points.items():
        alone = list(ActivationBuffer(texts, tiny_llama, point,
                                      io="in_to_out" if isinstance(point, tuple) else "out",
                                      **options))
        assert len(alone) == len(together)
        for a, t in zip(alone, together):
            for x, y in zip(a if isinstance(a, tuple) else (a,),
                            t[name] if isinstance(a, tuple) else (t[name],)):
                assert torch.equal(x, y), name


def test_shared_hook_point_read_once(tiny_llama):
    """Two entries naming the same hook point share its stored rows; io applies to single values."""
    texts = random_texts(6, seed=5)
    mlp_in = hook(tiny_llama, 1, "mlp_in")
    buffer = ActivationBuffer(texts, tiny_llama,
                              {"sae": mlp_in, "tc": (mlp_in, hook(tiny_llama, 1, "mlp_out")),
                               "mlp_input": "model.layers.1.mlp"},
                              io="in", n_ctxs=3, ctx_len=CTX, refresh_batch_size=3,
                              out_batch_size=1000)
    assert len(buffer.hooks) == 2  # mlp_in (= the mlp module's input) and mlp_out
    batch = next(buffer)
    assert torch.equal(batch["sae"], batch["tc"][0]) and torch.equal(batch["sae"],
                                                                     batch["mlp_input"])
    taken = ActivationBuffer(texts, tiny_llama, {"sae": mlp_in}, n_ctxs=3, ctx_len=CTX,
                             refresh_batch_size=3).take(20)
    assert set(taken) == {"sae"} and taken["sae"].shape == (20, 64)


@pytest.mark.parametrize("submodule,kwargs,message", [
    ({}, {}, "empty dict"),
    ({"a": "model.layers.9"}, {}, "submodule['a']"),
    ({3: "model.layers.0"}, {}, "names of a dict submodule"),
    ({"a": HookPoint("model.layers.0.mlp", "output")}, {"d_submodule": {"a": 65}},
     "d_submodule['a']=65"),
    ({"a": HookPoint("model.layers.0.mlp", "output")}, {"d_submodule": {"b": 64}},
     "not hook points"),
    ({"a": HookPoint("model.layers.0.mlp", "output")}, {"out_feats": 64}, "in_feats / out_feats"),
])
def test_bad_dicts(tiny_llama, submodule, kwargs, message):
    with pytest.raises((ValueError, TypeError),
                       match=message.replace("[", r"\[").replace("]", r"\]")):
        ActivationBuffer(random_texts(3), tiny_llama, submodule, n_ctxs=2, ctx_len=8, **kwargs)


def test_remote_reaches_every_trace(tiny_llama, monkeypatch):
    """remote=True asks nnsight for remote execution in every trace the buffer runs (NDIF is out of
    reach here: the trace runs locally once the flag is recorded), and the rows are those of a local
    buffer."""
    seen = []
    original = tiny_llama.trace

    def trace(*args, **kwargs):
        seen.append(kwargs.pop("remote", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_llama, "trace", trace)
    texts = random_texts(6, seed=8)
    points = suite_points(tiny_llama, [1])
    remote = list(ActivationBuffer(texts, tiny_llama, points, n_ctxs=2, ctx_len=CTX,
                                   refresh_batch_size=3, out_batch_size=40, remote=True))
    assert len(seen) >= 3 and all(seen)
    seen.clear()
    local = list(ActivationBuffer(texts, tiny_llama, points, n_ctxs=2, ctx_len=CTX,
                                  refresh_batch_size=3, out_batch_size=40))
    assert seen and not any(seen)
    for a, b in zip(remote, local):
        assert torch.equal(a["attn_1"], b["attn_1"]) and torch.equal(a["mlp_1"][1], b["mlp_1"][1])

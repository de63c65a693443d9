"""interp (feature_effect, examine_dimension, feature_umap) against plain forward hooks on each text
run alone, and grad_pursuit against a per-row float64 reference of the algorithm and a planted
sparse code."""

import sys
import types

import pytest
import torch

from dictionary_learning import ActivationBuffer, hook
from dictionary_learning.dictionary import AutoEncoderTopK
from dictionary_learning.grad_pursuit import dictionary_atoms, grad_pursuit
from dictionary_learning.interp import examine_dimension, feature_effect, feature_umap

from ..helpers import planted_codes, planted_features, random_texts

CTX = 24


def make_sae(seed=0):
    torch.manual_seed(seed)
    sae = AutoEncoderTopK(64, 128, 8)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    return sae


def per_text(model, texts, path, replace=None):
    """(last-position log-probs `[n, vocab]`, the module's outputs `[seq, d]` per text), each text
    run alone, the module's output optionally replaced by replace(output `[1, seq, d]`)."""
    module = model._module.get_submodule(path)
    outputs = []

    def output_hook(m, args, out):
        value = out[0] if isinstance(out, tuple) else out
        outputs.append(value[0].detach())
        if replace is None:
            return None
        new = replace(value)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = module.register_forward_hook(output_hook)
    try:
        with torch.no_grad():
            rows = []
            for text in texts:
                ids = model.tokenizer(text, return_tensors="pt", truncation=True,
                                      max_length=CTX)["input_ids"]
                rows.append(model._module(ids).logits[0, -1].log_softmax(-1))
    finally:
        handle.remove()
    return torch.stack(rows), outputs


def ablated(sae, feature, add_residual):
    def replace(x):  # [1, seq, d]
        codes = sae.encode(x[0])  # [seq, dict_size]
        kept = codes.clone()
        kept[-1, feature] = 0
        out = sae.decode(kept)
        if add_residual:
            out = out + x[0] - sae.decode(codes)
        return out[None]
    return replace


@pytest.mark.parametrize("add_residual", [True, False])
def test_feature_effect_matches_hook_reference(tiny_llama, add_residual):
    texts = random_texts(5, seed=31, max_words=12)
    sae = make_sae()
    path = "model.layers.1"
    clean, outputs = per_text(tiny_llama, texts, path)
    last_codes = sae.encode(torch.stack([o[-1] for o in outputs]))
    feature = int(last_codes.sum(0).argmax())  # the feature most active at the last positions
    if not add_residual:
        clean, _ = per_text(tiny_llama, texts, path, replace=lambda x: sae(x[0])[None])
    ablation, _ = per_text(tiny_llama, texts, path, replace=ablated(sae, feature, add_residual))
    values, tokens = (clean - ablation).mean(0).topk(5)
    got_tokens, got_values = feature_effect(tiny_llama, tiny_llama.model.layers[1], sae, feature,
                                            texts, max_length=CTX, add_residual=add_residual, k=5)
    torch.testing.assert_close(got_values, values, atol=1e-4, rtol=1e-4)
    assert got_tokens.tolist() == tokens.tolist() and values[0] > 1e-3
    lowest, _ = feature_effect(tiny_llama, path, sae, feature, texts, max_length=CTX,
                               add_residual=add_residual, k=3, largest=False)
    assert lowest.tolist() == (clean - ablation).mean(0).topk(3, largest=False).indices.tolist()


def test_feature_effect_of_a_model_dimension(tiny_gpt2):
    texts = random_texts(4, seed=32, max_words=12)

    def zero_dim(x):
        x = x.clone()
        x[:, -1, 7] = 0
        return x

    clean, _ = per_text(tiny_gpt2, texts, "transformer.h.2")
    ablation, _ = per_text(tiny_gpt2, texts, "transformer.h.2", replace=zero_dim)
    values, tokens = (clean - ablation).mean(0).topk(4)
    got_tokens, got_values = feature_effect(tiny_gpt2, tiny_gpt2.transformer.h[2], None, 7, texts,
                                            max_length=CTX, k=4)
    torch.testing.assert_close(got_values, values, atol=1e-4, rtol=1e-4)
    assert got_tokens.tolist() == tokens.tolist()


def test_examine_dimension(tiny_llama):
    texts = random_texts(12, seed=33, max_words=10)
    sae = make_sae(seed=1)
    buffer = ActivationBuffer(iter(texts), tiny_llama, hook(tiny_llama, 1, "resid"), n_ctxs=4,
                              ctx_len=CTX, refresh_batch_size=4, out_batch_size=16)
    _, outputs = per_text(tiny_llama, texts[:6], "model.layers.1")  # the 6 texts the profile reads
    codes = [sae.encode(o) for o in outputs]
    dim = int(torch.cat(codes).gt(0).sum(0).argmax())  # the most frequently firing feature
    profile = examine_dimension(tiny_llama, tiny_llama.model.layers[1], buffer, sae, max_length=CTX,
                                n_inputs=6, dim_idx=dim, k=5)
    assert type(profile).__name__ == "featureProfile" and profile._fields == ("top_contexts",
                                                                              "top_tokens",
                                                                             "top_affected")
    # mean activation per token, over the real tokens of the 6 texts
    ids = [tiny_llama.tokenizer(t, truncation=True, max_length=CTX)["input_ids"] for t in texts[:6]]
    sums, counts = {}, {}
    for row, c in zip(ids, codes):
        for token, value in zip(row, c[:, dim].tolist()):
            sums[token] = sums.get(token, 0.0) + value
            counts[token] = counts.get(token, 0) + 1
    means = {tiny_llama.tokenizer.decode(t): sums[t] / counts[t] for t in sums}
    expected = sorted(means.values(), reverse=True)[:5]
    assert [v for _, v in profile.top_tokens] == pytest.approx(expected, abs=1e-4)
    assert all(means[token] == pytest.approx(value, abs=1e-4)
               for token, value in profile.top_tokens)
    # the contexts end at the 5 strongest activations; without circuitsvis they come as
    # (tokens, activations)
    strongest = torch.cat([c[:, dim] for c in codes]).topk(5).values
    contexts = profile.top_contexts
    assert [acts[-1] for _, acts in contexts] == pytest.approx(strongest.tolist(), abs=1e-4)
    text_tokens = [[tiny_llama.tokenizer.decode(t) for t in row] for row in ids]
    assert all(any(row[: len(words)] == words for row in text_tokens) for words, _ in contexts)
    assert len(profile.top_affected) == 5 and all(isinstance(v, float)
                                                  for _, v in profile.top_affected)


@pytest.fixture
def fake_umap(monkeypatch):
    """Stand-ins for umap and plotly that record what they are given."""
    calls = {}

    class UMAP:
        def __init__(self, **kwargs):
            calls["umap"] = kwargs

        def fit_transform(self, vectors):
            calls["vectors"] = torch.as_tensor(vectors)
            return vectors[:, : calls["umap"]["n_components"]]

    def scatter(**kwargs):
        calls["scatter"] = kwargs
        return "figure"

    plotly, express = types.ModuleType("plotly"), types.ModuleType("plotly.express")
    express.scatter, express.scatter_3d = scatter, scatter
    plotly.express = express
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=UMAP))
    monkeypatch.setitem(sys.modules, "plotly", plotly)
    monkeypatch.setitem(sys.modules, "plotly.express", express)
    return calls


def test_feature_umap_embeds_decoder_or_encoder_rows(fake_umap):
    sae = make_sae()
    assert feature_umap(sae, feat_idxs=[2, 5]) == "figure"
    torch.testing.assert_close(fake_umap["vectors"], sae.decoder.weight.T.detach())
    assert fake_umap["umap"] == {"n_neighbors": 15, "metric": "cosine", "min_dist": 0.05,
                                 "n_components": 2}
    colors = fake_umap["scatter"]["color"]
    assert [i for i, c in enumerate(colors) if c == "red"] == [2, 5] and len(colors) == 128
    feature_umap(sae, weight="encoder", n_components=3, feat_idxs=4)
    torch.testing.assert_close(fake_umap["vectors"], sae.encoder.weight.detach())
    assert "z" in fake_umap["scatter"] and fake_umap["scatter"]["color"].count("red") == 1
    feature_umap(sae)
    assert fake_umap["scatter"]["color"] is None
    with pytest.raises(ValueError, match="weight must be"):
        feature_umap(sae, weight="both")


def test_feature_umap_needs_umap(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    with pytest.raises(ImportError, match="umap-learn"):
        feature_umap(make_sae())


# --------------------------------------------------------------------------------------------------
# grad_pursuit


def reference_pursuit(signal, atoms, target_l0):
    """The algorithm row by row in float64: pick the atom best aligned with the residual, step along
    the gradient restricted to the picked atoms with the line-search optimum, clip at zero."""
    signal, atoms = signal.double(), atoms.double()
    codes = torch.zeros(signal.shape[0], atoms.shape[1], dtype=torch.float64)
    for row in range(signal.shape[0]):
        w, picked = codes[row], set()
        for _ in range(target_l0):
            residual = signal[row] - atoms @ w
            alignment = atoms.T @ residual
            picked.add(int(alignment.argmax()))
            g = torch.zeros_like(w)
            for j in picked:
                g[j] = alignment[j]
            moved = atoms @ g
            step = float(moved @ residual) / float(moved @ moved)
            w = torch.clamp(w + step * g, min=0)
        codes[row] = w
    return codes


def test_grad_pursuit_matches_reference():
    generator = torch.Generator().manual_seed(2)
    atoms = torch.randn(16, 40, generator=generator, dtype=torch.float64)
    signal = torch.randn(12, 16, generator=generator, dtype=torch.float64)
    got = grad_pursuit(signal, atoms, target_l0=6)
    torch.testing.assert_close(got, reference_pursuit(signal, atoms, 6), atol=1e-10, rtol=1e-10)
    assert ((got > 0).sum(1) <= 6).all() and (got >= 0).all()


def test_grad_pursuit_recovers_a_planted_code():
    features = planted_features(256, 64, seed=3)  # unit-norm atoms, as rows
    codes = planted_codes(256, 256, 4, torch.Generator().manual_seed(4))
    signal = codes @ features
    got = grad_pursuit(signal, features.T, target_l0=8)
    true_support = codes > 0
    top4 = torch.zeros_like(true_support).scatter_(1, got.topk(4, dim=1).indices, True)
    support_recovered = (top4 & true_support).sum().item() / true_support.sum().item()
    code_error = ((got - codes).norm(dim=1) / codes.norm(dim=1)).mean().item()
    assert support_recovered >= 0.99 and code_error < 0.01, (support_recovered, code_error)


def test_grad_pursuit_on_a_dictionary():
    sae = make_sae(seed=2)
    atoms, bias = dictionary_atoms(sae)
    torch.testing.assert_close(atoms, sae.decoder.weight.detach())
    torch.testing.assert_close(bias, sae.b_dec.detach())
    codes = planted_codes(32, 128, 3, torch.Generator().manual_seed(5))
    with torch.no_grad():
        signal = sae.decode(codes)
    got = grad_pursuit(signal, sae, target_l0=6)
    with torch.no_grad():
        assert ((sae.decode(got) - signal).norm(dim=1)
                / (signal - sae.b_dec).norm(dim=1)).max() < 0.05
    with pytest.raises(ValueError, match=r"signal must be .*\[batch, d\]"):
        grad_pursuit(signal[0], sae)
    with pytest.raises(ValueError, match="atoms have width 64"):
        grad_pursuit(torch.randn(3, 10), atoms)
    with pytest.raises(ValueError, match="target_l0"):
        grad_pursuit(signal, atoms, target_l0=0)

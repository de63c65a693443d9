"""Shared test helpers: independent reference computations and test data."""

import os
import pathlib

import pytest
import torch


class RunsCode:
    """A pickle payload: unpickling it without weights_only would create the file `marker` (the
    tests check that it never appears)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def missing_peer(venv: str, why: str = "not built") -> None:
    """Skip a `peers` test whose peer venv is missing, saying how to build it; under
    DL_REQUIRE_PEERS=1 (CI, which builds every venv) fail instead, so a broken peer set-up cannot
    pass as skipped tests."""
    message = (f"the {venv} peer venv is {why}: `bash bench/setup_peers.sh {venv}` builds it (a "
               "few minutes and ~1.5 GB each; `bash bench/setup_peers.sh` builds them all)")
    if os.environ.get("DL_REQUIRE_PEERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


WORDS = (
    "the a river stone light house quietly ran over under green old new city song letter morning "
    "winter bright sudden garden paper window friend table and but because when then clock silver "
    "mountain"
).split()


def random_texts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 60) -> list[str]:
    """Distinct pseudo-English texts of varied length (some longer than the test contexts)."""
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(n):
        length = int(torch.randint(min_words, max_words + 1, (1,), generator=generator))
        words = [WORDS[j] for j in torch.randint(len(WORDS), (length,), generator=generator)]
        texts.append(f"{i}: " + " ".join(words) + ".")
    return texts


def hook_reference(model, texts, points, ctx_len, drop_first=False):
    """Activations at `points` recorded by plain PyTorch forward hooks, running each text alone
    (no padding).

    Returns one `[n_tokens, d]` tensor per point; `drop_first` drops each text's first token.
    """
    torch_model = model._module
    tokenizer = model.tokenizer
    rows = [[] for _ in points]
    current = [None] * len(points)
    handles = []
    for i, point in enumerate(points):
        module = torch_model.get_submodule(point.path)

        def take(value, i=i):
            while isinstance(value, (tuple, list)):
                value = value[0]
            current[i] = value.detach()

        if point.io == "output":
            handles.append(module.register_forward_hook(lambda m, args, out, take=take: take(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, args, take=take: take(args)))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, truncation=True, max_length=ctx_len,
                                return_tensors="pt")["input_ids"]
                torch_model(ids)
                for i in range(len(points)):
                    rows[i].append(current[i][0, 1:] if drop_first else current[i][0])
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(r) for r in rows]


def assert_same_rows(actual, expected, atol=1e-4):
    """The rows of `actual` are those of `expected` in some order (a multiset match within atol)."""
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    distances = torch.cdist(actual, expected)  # [n_actual, n_expected]
    scale = 1 + expected.norm(dim=-1).max()
    assert distances.min(dim=1).values.max() <= atol * scale, "a row has no match in the reference"
    assert distances.min(dim=0).values.max() <= atol * scale, "a reference row is missing"


class Crash(Exception):
    """What `crashing` raises: a run killed part way."""


def crashing(stream, after):
    """`stream`'s items until item `after`, where it raises Crash (an interrupted run)."""
    for i, batch in enumerate(stream):
        if i == after:
            raise Crash
        yield batch


def planted_features(n_features, d, seed):
    """Unit-norm ground-truth feature directions [n_features, d]."""
    features = torch.randn(n_features, d, generator=torch.Generator().manual_seed(seed))
    return features / features.norm(dim=1, keepdim=True)


def planted_codes(n_tokens, n_features, k_active, generator):
    """Sparse non-negative codes: k_active distinct features per token, magnitudes in [0.5, 2.5]."""
    chosen = torch.rand(n_tokens, n_features, generator=generator).topk(k_active, dim=1).indices
    magnitudes = 0.5 + 2 * torch.rand(n_tokens, k_active, generator=generator)
    return torch.zeros(n_tokens, n_features).scatter_(1, chosen, magnitudes)


def planted_stream(features_in, k_active, batch, n_batches, seed, features_out=None, noise=0.01):
    """Batches x = codes @ features_in + noise, or (x, y) pairs with y = codes @ features_out when
    given."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        codes = planted_codes(batch, features_in.shape[0], k_active, generator)
        x = codes @ features_in + noise * torch.randn(batch, features_in.shape[1],
                                                      generator=generator)
        if features_out is None:
            yield x
        else:
            yield x, codes @ features_out + noise * torch.randn(batch, features_out.shape[1],
                                                                generator=generator)


def fraction_recovered(features, decoder_weight, threshold=0.9):
    """Fraction of true features whose best-matching decoder column has cosine >= threshold."""
    columns = decoder_weight / decoder_weight.norm(dim=0, keepdim=True)
    return ((features @ columns).max(dim=1).values >= threshold).float().mean().item()


CTX = 24  # context length of the SCAE tests


def make_suite(model, n_layer=3, seed=0):
    """A random SCAE suite on the first `n_layer` layers with non-zero biases, so every bias path is
    exercised."""
    from dictionary_learning.scae import SCAESuite

    suite = SCAESuite.random(model, d_sae=96, k=8, n_layer=n_layer, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in suite.dictionaries.values():
            module.b_dec.copy_(0.1 * torch.randn(module.b_dec.shape, generator=generator))
            module.encoder.bias.copy_(0.1 * torch.randn(module.encoder.bias.shape,
                                                        generator=generator))
    return suite

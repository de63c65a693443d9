"""SCAE connection selection against a dense per-token reference; top C and the connections file."""

import pytest
import torch

from dictionary_learning.scae import run_suite, sources_of

from ..helpers import CTX, make_suite, random_texts


def test_select_connections_keeps_the_largest_mean_contributions(eager_model):
    """Against a dense reference: every token's contribution of every source feature, written out
    from the record (norm scale, code, decoder column, norm weight, attention pattern, OV weights,
    encoder row)."""
    from dictionary_learning.models import attention_ov, norm_params
    from dictionary_learning.scae import select_connections

    suite = make_suite(eager_model, n_layer=2)
    texts = random_texts(4, seed=24, max_words=6)
    C = 6
    connections = select_connections(suite, eager_model, texts, C, batch_size=2, ctx_len=CTX)
    totals, count = {}, 0
    for start in (0, 2):
        record, _ = run_suite(suite, eager_model, texts[start:start + 2], ctx_len=CTX)
        count += int(record.mask.sum())
        for name in ("mlp_0", "attn_1", "mlp_1"):
            kind, layer = name.split("_")[0], int(name[-1])
            norm = norm_params(eager_model, layer, kind)
            # [b, t, n_sources]
            codes = torch.cat([record.codes[source] for source in sources_of(name)], dim=-1)
            # [n_sources, d]
            columns = torch.cat([suite[source].decoder.weight.t() for source in sources_of(name)])
            if norm.kind == "layer":
                columns = columns - columns.mean(-1, keepdim=True)
            columns = columns * norm.weight
            scaled = codes * record.norm_scales[name][..., None]
            encoder = suite[name].encoder.weight
            if kind == "mlp":
                per_token = torch.einsum("btj,jd,fd->btfj", scaled, columns, encoder)
            else:
                ov = attention_ov(eager_model, layer)
                head_out = torch.einsum("jd,hde,hem->hjm", columns, ov.W_V, ov.W_O)
                per_token = torch.einsum("bhqk,bkj,hjm,fm->bqfj", record.patterns[layer], scaled,
                                         head_out, encoder)
            totals[name] = totals.get(name, 0) + per_token[record.mask].sum(0)
    for name, total in totals.items():
        mean = (total / count).abs()
        expected = mean.topk(C, dim=1).indices.sort(dim=1).values
        got = connections.indices[name]
        assert got.shape == (suite[name].dict_size, C)
        agree = sum(len(set(a.tolist()) & set(b.tolist()))
                    for a, b in zip(got, expected)) / got.numel()
        assert agree > 0.99, (f"{name}: only {agree:.1%} of selected connections match the dense "
                              "reference")
    assert connections.indices["attn_0"].shape == (96, 0)
    with pytest.raises(ValueError, match="C must be a positive int, got 0"):
        select_connections(suite, eager_model, texts, 0)


def test_top_c_and_connection_files(tmp_path, eager_model):
    """Selected rows come strongest first, so the top C of a larger selection is the selection at C;
    scores and totals survive a save / load round trip."""
    from dictionary_learning.scae import (
        all_connections,
        load_connections,
        save_connections,
        select_connections,
        virtual_weights,
    )

    suite = make_suite(eager_model, n_layer=2)
    texts = random_texts(4, seed=32, max_words=6)
    wide = select_connections(suite, eager_model, texts, 12, ctx_len=CTX)
    narrow = select_connections(suite, eager_model, texts, 3, ctx_len=CTX)
    for name in ("mlp_0", "attn_1", "mlp_1"):
        assert torch.equal(wide.top(3).indices[name], narrow.indices[name])
        assert (wide.scores[name][:, :-1] >= wide.scores[name][:, 1:]).all()
        assert (wide.scores[name].sum(1) <= wide.totals[name] * (1 + 1e-5)).all()
        # the virtual weights of a subset equal the matching entries of C = all (the two contraction
        # orders agree)
        full = all_connections(suite, eager_model)
        rows = torch.arange(suite[name].dict_size)[:, None]
        torch.testing.assert_close(wide.weights[name], full.weights[name][rows, wide.indices[name]])
        torch.testing.assert_close(virtual_weights(suite, eager_model, name, wide.indices[name]),
                                   wide.weights[name])
    save_connections(wide, tmp_path / "c.safetensors")
    loaded = load_connections(tmp_path / "c.safetensors")
    for field in ("indices", "weights", "scores", "totals"):
        for name, tensor in getattr(wide, field).items():
            assert torch.equal(getattr(loaded, field)[name], tensor), (field, name)
    with pytest.raises(ValueError, match="C must be a positive int, got -1"):
        wide.top(-1)

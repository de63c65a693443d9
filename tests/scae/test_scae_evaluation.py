"""SCAE metrics: CE of clean, dense and pruned suites, per-module FVU / L0 against a forward hook,
CE against C, plots."""

import pytest
import torch

from dictionary_learning import load_model
from dictionary_learning.models import get_adapter

from ..helpers import CTX, make_suite, random_texts


def test_cross_entropy_of_dense_and_pruned_suites(eager_model):
    from dictionary_learning.scae import all_connections, suite_cross_entropy

    suite = make_suite(eager_model, n_layer=2)
    texts = random_texts(3, seed=25, max_words=6)
    results = suite_cross_entropy(suite, eager_model, texts, all_connections(suite, eager_model),
                                  ctx_len=CTX)
    # C = all: pruned == dense
    assert results["ce_pruned"] == pytest.approx(results["ce_dense"], abs=1e-4)
    assert results["ce_dense"] != pytest.approx(results["ce_clean"], abs=1e-3)


def test_evaluate_suite_module_metrics(eager_model):
    """attn_0 reads the clean model's first attention output (nothing is patched before it), so its
    dense FVU and L0 can be computed from a plain forward hook; with C = all the pruned metrics
    equal the dense ones."""
    from dictionary_learning.scae import all_connections, evaluate_suite

    suite = make_suite(eager_model, n_layer=2)
    texts = random_texts(5, seed=33, max_words=6)
    result = evaluate_suite(suite, eager_model, texts, all_connections(suite, eager_model),
                            batch_size=2, ctx_len=CTX)
    captured = []
    adapter, torch_model = get_adapter(eager_model), eager_model._module
    attn = torch_model.get_submodule(f"{adapter.block(0)}.{adapter.attn}")
    handle = attn.register_forward_hook(lambda m, a, out: captured.append(out[0][0]))
    try:
        with torch.no_grad():
            for text in texts:
                ids = eager_model.tokenizer(text, return_tensors="pt", truncation=True,
                                            max_length=CTX)["input_ids"]
                torch_model(ids)
    finally:
        handle.remove()
    target = torch.cat(captured)  # [tokens, d_model]
    with torch.no_grad():
        codes = suite["attn_0"].encode(target)
        fvu = ((suite["attn_0"].decode(codes) - target).pow(2).sum()
               / (target - target.mean(0)).pow(2).sum())
    metrics = result["modules"]
    assert metrics["attn_0"]["fvu_dense"] == pytest.approx(fvu.item(), rel=1e-4)
    assert metrics["attn_0"]["l0_dense"] == pytest.approx((codes > 0).sum(-1).float().mean().item())
    for name in suite.names:
        assert metrics[name]["fvu_pruned"] == pytest.approx(metrics[name]["fvu_dense"], rel=1e-4)
        assert metrics[name]["l0_pruned"] == pytest.approx(metrics[name]["l0_dense"])
        assert 0 < metrics[name]["l0_dense"] <= suite[name].k
    assert result["ce_pruned"] == pytest.approx(result["ce_dense"], abs=1e-4)


def test_ce_versus_c_curve(tmp_path, tiny_gpt2):
    from dictionary_learning.scae import ce_table, ce_versus_c, module_table, plot_ce_versus_c

    model = load_model("tiny-gpt2", attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    texts = random_texts(8, seed=29, max_words=6)
    rows = ce_versus_c(suite, model, texts[:4], texts[4:], [1, 4, 10_000], batch_size=4,
                       ctx_len=CTX)
    assert [r["C"] for r in rows] == [1, 4, 10_000]
    # C beyond all: the dense suite
    assert rows[-1]["ce_pruned"] == pytest.approx(rows[-1]["ce_dense"], abs=1e-4)
    assert len({round(r["ce_clean"], 6) for r in rows}) == 1
    plot_ce_versus_c({"before": rows}, tmp_path / "ce.png")
    assert (tmp_path / "ce.png").read_bytes()[:4] == b"\x89PNG"
    assert ce_table(rows).count("\n") == 4
    assert module_table(rows[0]).count("\n") == 1 + len(suite.names)
    assert (rows[-1]["modules"]["mlp_1"]["fvu_pruned"]
            == pytest.approx(rows[-1]["modules"]["mlp_1"]["fvu_dense"], rel=1e-4))
    from dictionary_learning.scae import select_connections

    selected = select_connections(suite, model, texts[:4], 4, batch_size=4, ctx_len=CTX)
    again = ce_versus_c(suite, model, None, texts[4:], [1, 4], batch_size=4, ctx_len=CTX,
                        connections=selected)
    assert [r["ce_pruned"] for r in again] == pytest.approx([r["ce_pruned"] for r in rows[:2]],
                                                            abs=1e-6)
    with pytest.raises(ValueError, match="mlp_0: C = 8 needs 8 connections per feature, the "
                                         "connections given have 4"):
        ce_versus_c(suite, model, None, texts[4:], [8], ctx_len=CTX, connections=selected)


def test_connection_statistics_plot(tmp_path, tiny_llama):
    from dictionary_learning.scae import Connections, plot_connection_statistics, select_connections

    model = load_model("tiny-llama", attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    many = select_connections(suite, model, random_texts(4, seed=31, max_words=6), 64, ctx_len=CTX)
    share_few = plot_connection_statistics(many.top(4), tmp_path / "few.png")["median_share_kept"]
    share_many = plot_connection_statistics(many, tmp_path / "many.png")["median_share_kept"]
    assert 0 < share_few < share_many <= 1
    assert (tmp_path / "few.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="carry no scores"):
        plot_connection_statistics(Connections(many.indices, many.weights), tmp_path / "none.png")

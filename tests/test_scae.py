"""SCAE: the suite run against plain forward hooks, and the linear decomposition against dense pre-activations."""

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning import load_model
from dictionary_learning.models import get_adapter
from dictionary_learning.scae import SCAESuite, decompose, run_suite, upstream_of

from .helpers import random_texts

CTX = 24


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def eager_model(request):
    return load_model(request.param, attn_implementation="eager")


def make_suite(model, n_layer=3, seed=0):
    suite = SCAESuite.random(model, dict_size=96, k=8, n_layer=n_layer, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases, so every bias path is exercised
        for module in suite.dictionaries.values():
            module.b_dec.copy_(0.1 * torch.randn(module.b_dec.shape, generator=generator))
            module.encoder.bias.copy_(0.1 * torch.randn(module.encoder.bias.shape, generator=generator))
    return suite


def test_run_suite_patches_every_module(eager_model):
    """The logits equal a plain PyTorch run whose forward hooks replace each attention output and MLP output by
    the suite's reconstructions, each text run alone."""
    suite = make_suite(eager_model)
    texts = random_texts(3, seed=20, max_words=8)
    record, logits = run_suite(suite, eager_model, texts, ctx_len=CTX)
    adapter, torch_model = get_adapter(eager_model), eager_model._module
    handles = []
    for layer in range(suite.n_layers):
        attn = torch_model.get_submodule(f"{adapter.block(layer)}.{adapter.attn}")
        mlp = torch_model.get_submodule(f"{adapter.block(layer)}.{adapter.mlp}")
        sae, transcoder = suite[f"attn_{layer}"], suite[f"mlp_{layer}"]
        handles.append(attn.register_forward_hook(lambda m, a, out, sae=sae: (sae(out[0]), *out[1:])))
        handles.append(mlp.register_forward_hook(lambda m, a, out, t=transcoder: t(a[0])))
    try:
        with torch.no_grad():
            for row, text in enumerate(texts):
                ids = eager_model.tokenizer(text, return_tensors="pt", truncation=True, max_length=CTX)["input_ids"]
                expected = torch_model(ids).logits[0]
                got = logits[row][record.mask[row]]
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        for handle in handles:
            handle.remove()


def test_decomposition_equals_dense_pre_activations(eager_model):
    """With every upstream feature kept, the per-upstream terms + embedding + bias equal each module's dense
    encoder pre-activation in the recorded run, for attention SAEs and transcoders alike."""
    suite = make_suite(eager_model)
    record, _ = run_suite(suite, eager_model, random_texts(3, seed=21, max_words=8), ctx_len=CTX)
    for name in suite.names:
        module = suite[name]
        x = record.encoder_inputs[name]
        dense = F.linear(x if module.transcoder else x - module.b_dec, module.encoder.weight, module.encoder.bias)
        terms = decompose(suite, eager_model, record, name)
        assert set(terms) == {*upstream_of(name), "embedding", "bias"}
        total = sum(terms.values())
        mask = record.mask
        torch.testing.assert_close(total[mask], dense[mask], atol=1e-4, rtol=1e-4, msg=name)
        if upstream_of(name):  # upstream features do contribute
            assert max(t[mask].abs().max() for k, t in terms.items() if k not in ("embedding", "bias")) > 1e-3


def test_suite_save_load_and_errors(tmp_path, tiny_llama):
    from dictionary_learning.scae import Connections, all_connections

    suite = make_suite(tiny_llama, n_layer=2)
    suite.save(tmp_path / "bare")
    assert SCAESuite.load(tmp_path / "bare").connections is None
    suite.connections = all_connections(suite, tiny_llama)
    suite.save(tmp_path / "suite")
    loaded = SCAESuite.load(tmp_path / "suite")
    x = torch.randn(4, 64)
    for name in suite.names:
        torch.testing.assert_close(loaded[name](x), suite[name](x))
        assert torch.equal(loaded.connections.indices[name], suite.connections.indices[name])
        assert torch.equal(loaded.connections.weights[name], suite.connections.weights[name])
    wrong = Connections({n: i[:5] for n, i in suite.connections.indices.items()}, suite.connections.weights)
    with pytest.raises(ValueError, match=r"attn_0: expected indices of shape \[96, C\], got \(5, 0\)"):
        SCAESuite(dict(suite.dictionaries.items()), connections=wrong)
    modules = dict(suite.dictionaries.items())
    with pytest.raises(ValueError, match="expected \\['attn_0', 'mlp_0', 'attn_1', 'mlp_1'\\]"):
        SCAESuite({k: v for k, v in modules.items() if k != "mlp_1"})
    wrong = SCAESuite.random(load_model("tiny-gpt2"), dict_size=16, k=2, n_layer=1)
    with pytest.raises(ValueError, match="width is 64"):
        wrong.check_model(tiny_llama)
    with pytest.raises(ValueError, match="not a saved SCAESuite"):
        SCAESuite.load(tmp_path)


def test_all_connections_reproduce_the_dense_suite(eager_model):
    """C = all: the pruned forward pass (each module from upstream pruned codes) gives the recorded codes."""
    from dictionary_learning.scae import all_connections, pruned_forward

    suite = make_suite(eager_model)
    record, _ = run_suite(suite, eager_model, random_texts(3, seed=22, max_words=8), ctx_len=CTX)
    codes = pruned_forward(suite, eager_model, record, all_connections(suite, eager_model))
    for name in suite.names:
        torch.testing.assert_close(codes[name][record.mask], record.codes[name][record.mask], atol=1e-4, rtol=1e-4,
                                   msg=name)


def test_pruning_removes_exactly_the_unselected_contributions(eager_model):
    """With a random subset of connections and the recorded upstream codes, the pruned pre-activation of a feature
    equals the dense one minus the contributions of its unselected upstream features, each measured by running the
    decomposition with only that upstream feature switched on."""
    from dictionary_learning.scae import (
        Connections, all_connections, pruned_pre_activations, virtual_weights,
    )

    suite = make_suite(eager_model, n_layer=2)
    record, _ = run_suite(suite, eager_model, random_texts(2, seed=23, max_words=6), ctx_len=CTX)
    full = all_connections(suite, eager_model)
    generator = torch.Generator().manual_seed(3)
    for name in ("mlp_0", "attn_1", "mlp_1"):
        n_up = full.indices[name].shape[1]
        keep = torch.stack([torch.randperm(n_up, generator=generator)[:5] for _ in range(suite[name].dict_size)])
        subset = Connections({name: keep}, {name: virtual_weights(suite, eager_model, name, keep)})
        pruned = pruned_pre_activations(suite, eager_model, record, subset, name, record.codes)
        dense = pruned_pre_activations(suite, eager_model, record, full, name, record.codes)
        upstream = upstream_of(name)
        sizes = [suite[up].dict_size for up in upstream]
        for feature in (0, 7):
            removed = torch.zeros_like(dense[..., feature])
            kept = set(keep[feature].tolist())
            for j in range(n_up):
                if j in kept:
                    continue
                module_index = next(i for i, end in enumerate(torch.tensor(sizes).cumsum(0).tolist()) if j < end)
                local = j - sum(sizes[:module_index])
                only = {up: torch.zeros_like(record.codes[up]) for up in upstream}
                only[upstream[module_index]][..., local] = record.codes[upstream[module_index]][..., local]
                if only[upstream[module_index]].abs().sum() == 0:
                    continue
                terms = decompose(suite, eager_model, record, name, upstream_codes=only)
                removed += terms[upstream[module_index]][..., feature]
            mask = record.mask
            assert removed[mask].abs().max() > 1e-3  # pruning did remove something
            torch.testing.assert_close(pruned[..., feature][mask], (dense[..., feature] - removed)[mask],
                                       atol=1e-4, rtol=1e-4, msg=f"{name} feature {feature}")


def test_select_connections_keeps_the_largest_mean_contributions(eager_model):
    """Against a dense reference: every token's contribution of every upstream feature, written out from the
    record (norm scale, code, decoder column, norm weight, attention pattern, OV weights, encoder row)."""
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
            codes = torch.cat([record.codes[up] for up in upstream_of(name)], dim=-1)  # [b, t, n_up]
            columns = torch.cat([suite[up].decoder.weight.t() for up in upstream_of(name)])  # [n_up, d]
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
                per_token = torch.einsum("bhqk,bkj,hjm,fm->bqfj", record.patterns[layer], scaled, head_out, encoder)
            totals[name] = totals.get(name, 0) + per_token[record.mask].sum(0)
    for name, total in totals.items():
        mean = (total / count).abs()
        expected = mean.topk(C, dim=1).indices.sort(dim=1).values
        got = connections.indices[name]
        assert got.shape == (suite[name].dict_size, C)
        agree = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, expected)) / got.numel()
        assert agree > 0.99, f"{name}: only {agree:.1%} of selected connections match the dense reference"
    assert connections.indices["attn_0"].shape == (96, 0)
    with pytest.raises(ValueError, match="C must be a positive int, got 0"):
        select_connections(suite, eager_model, texts, 0)


def test_cross_entropy_of_dense_and_pruned_suites(eager_model):
    from dictionary_learning.scae import all_connections, suite_cross_entropy

    suite = make_suite(eager_model, n_layer=2)
    texts = random_texts(3, seed=25, max_words=6)
    results = suite_cross_entropy(suite, eager_model, texts, all_connections(suite, eager_model), ctx_len=CTX)
    assert results["ce_pruned"] == pytest.approx(results["ce_dense"], abs=1e-4)  # C = all: pruned == dense
    assert results["ce_dense"] != pytest.approx(results["ce_clean"], abs=1e-3)


def test_bad_connections_raise(eager_model):
    from dictionary_learning.scae import Connections, all_connections, pruned_forward

    suite = make_suite(eager_model, n_layer=2)
    record, _ = run_suite(suite, eager_model, random_texts(1, seed=26, max_words=4), ctx_len=CTX)
    full = all_connections(suite, eager_model)
    broken = Connections(dict(full.indices), dict(full.weights))
    broken.indices["mlp_1"] = broken.indices["mlp_1"].clone()
    broken.indices["mlp_1"][0, 0] = 10_000
    with pytest.raises(ValueError, match=r"mlp_1: connection indices must lie in \[0, 288\)"):
        pruned_forward(suite, eager_model, record, broken)
    broken.indices["mlp_1"][0, 0] = broken.indices["mlp_1"][0, 1]
    with pytest.raises(ValueError, match="mlp_1: a feature lists the same upstream feature twice"):
        pruned_forward(suite, eager_model, record, broken)
    broken.indices["mlp_1"] = full.indices["mlp_1"][:, :3]
    with pytest.raises(ValueError, match=r"mlp_1: weights of shape \(96, 288\) do not match indices \(96, 3\)"):
        pruned_forward(suite, eager_model, record, broken)


def test_ce_gradients_reach_every_trained_parameter(eager_model):
    from dictionary_learning.scae import SCAETrainer, select_connections

    suite = make_suite(eager_model, n_layer=2)
    texts = random_texts(4, seed=27, max_words=6)
    connections = select_connections(suite, eager_model, texts, 8, ctx_len=CTX)
    trainer = SCAETrainer(suite, eager_model, connections, steps=3, mse_weight=0.0, ce_weight=1.0, ctx_len=CTX)
    loss = trainer.loss(texts)
    loss.backward()
    for name, parameter in suite.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no CE gradient reaches {name}"
    assert all(p.grad is None for p in eager_model._module.parameters())  # the model itself is frozen


def test_fine_tuning_lowers_the_loss_and_resumes(tmp_path, eager_model):
    from dictionary_learning.scae import select_connections, train_scae_suite, virtual_weights

    texts = random_texts(48, seed=28, max_words=6)
    suite = make_suite(eager_model, n_layer=2)
    connections = select_connections(suite, eager_model, texts[:8], 8, ctx_len=CTX)
    kwargs = dict(steps=6, batch_texts=4, lr=3e-3, ctx_len=CTX, progress=False)
    straight = train_scae_suite(make_suite(eager_model, n_layer=2), eager_model, iter(texts), connections,
                                save_dir=tmp_path / "a", **kwargs)
    before = SCAESuite.load(tmp_path / "a" / "suite")
    first = make_suite(eager_model, n_layer=2)
    from dictionary_learning.scae import SCAETrainer
    start_loss = SCAETrainer(first, eager_model, connections, steps=1, ctx_len=CTX).loss(texts[:4]).item()
    assert straight.last_metrics["loss"] < start_loss

    def crashing():
        for i, text in enumerate(texts):
            if i == 14:  # during step 3 (4 texts a step)
                raise RuntimeError("crash")
            yield text

    with pytest.raises(RuntimeError):
        train_scae_suite(make_suite(eager_model, n_layer=2), eager_model, crashing(), connections,
                         save_dir=tmp_path / "b", checkpoint_steps=2, **kwargs)
    resumed = train_scae_suite(make_suite(eager_model, n_layer=2), eager_model, iter(texts), connections,
                               save_dir=tmp_path / "b", resume=True, checkpoint_steps=2, **kwargs)
    # equal up to float noise: the gather backward accumulates in a thread-dependent order (two uninterrupted runs
    # differ by ~1e-6 too)
    for (name, a), b in zip(straight.suite.state_dict().items(), resumed.suite.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    for (name, a), b in zip(before.state_dict().items(), straight.suite.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    loaded = before.connections  # saved with the suite: the same connections, weights of the tuned parameters
    assert all(torch.equal(loaded.indices[n], connections.indices[n]) for n in connections.indices)
    tuned = virtual_weights(straight.suite, eager_model, "attn_1", connections.indices["attn_1"])
    torch.testing.assert_close(loaded.weights["attn_1"], tuned)
    assert not torch.allclose(tuned, connections.weights["attn_1"])


def test_ce_versus_c_curve(tmp_path, tiny_gpt2):
    from dictionary_learning.scae import ce_table, ce_versus_c, module_table, plot_ce_versus_c

    model = load_model("tiny-gpt2", attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    texts = random_texts(8, seed=29, max_words=6)
    rows = ce_versus_c(suite, model, texts[:4], texts[4:], [1, 4, 10_000], batch_size=4, ctx_len=CTX)
    assert [r["C"] for r in rows] == [1, 4, 10_000]
    assert rows[-1]["ce_pruned"] == pytest.approx(rows[-1]["ce_dense"], abs=1e-4)  # C beyond all: the dense suite
    assert len({round(r["ce_clean"], 6) for r in rows}) == 1
    plot_ce_versus_c({"before": rows}, tmp_path / "ce.png")
    assert (tmp_path / "ce.png").read_bytes()[:4] == b"\x89PNG"
    assert ce_table(rows).count("\n") == 4
    assert module_table(rows[0]).count("\n") == 1 + len(suite.names)
    assert rows[-1]["modules"]["mlp_1"]["fvu_pruned"] == pytest.approx(rows[-1]["modules"]["mlp_1"]["fvu_dense"],
                                                                       rel=1e-4)
    from dictionary_learning.scae import select_connections

    selected = select_connections(suite, model, texts[:4], 4, batch_size=4, ctx_len=CTX)
    again = ce_versus_c(suite, model, None, texts[4:], [1, 4], batch_size=4, ctx_len=CTX, connections=selected)
    assert [r["ce_pruned"] for r in again] == pytest.approx([r["ce_pruned"] for r in rows[:2]], abs=1e-6)
    with pytest.raises(ValueError, match="mlp_0: C = 8 needs 8 connections per feature, the connections given have 4"):
        ce_versus_c(suite, model, None, texts[4:], [8], ctx_len=CTX, connections=selected)


def test_fine_tuning_keeps_decoder_column_norms(eager_model):
    """Folded transcoders have decoder columns of norm c_in / c_out, not 1: a step must not reset them."""
    from dictionary_learning.scae import SCAETrainer, all_connections

    suite = make_suite(eager_model, n_layer=1)
    with torch.no_grad():
        suite["mlp_0"].decoder.weight.mul_(3.0)
    norms = suite["mlp_0"].decoder.weight.norm(dim=0).clone()
    trainer = SCAETrainer(suite, eager_model, all_connections(suite, eager_model), steps=2, lr=1e-3, ctx_len=CTX)
    trainer.update(0, random_texts(2, seed=30, max_words=5))
    torch.testing.assert_close(suite["mlp_0"].decoder.weight.norm(dim=0), norms)


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


@pytest.mark.parametrize("heads", [None, 3])
def test_connect_matches_a_dense_masked_product(heads):
    """Summing connected upstream codes (a sparse product over the connected, active columns only) equals x @ M^T
    with the dense connection matrix M, in value and in the gradients of the weights and of the active upstream
    values."""
    from dictionary_learning.scae import _connect

    generator = torch.Generator().manual_seed(5)
    sizes, n_features, C, tokens = [7, 5, 9], 6, 4, 10
    n_up = sum(sizes)
    upstream = [torch.randn(tokens, n, generator=generator, dtype=torch.float64)
                * (torch.rand(tokens, n, generator=generator) < 0.3) for n in sizes]
    indices = torch.stack([torch.randperm(n_up, generator=generator)[:C] for _ in range(n_features)])
    shape = (n_features, C) if heads is None else (n_features, C, heads)
    weights = torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
    leaves = [x.clone().requires_grad_(True) for x in upstream]
    got = _connect(leaves, indices, weights)

    reference_weights = weights.detach().clone().requires_grad_(True)
    reference_leaves = [x.clone().requires_grad_(True) for x in upstream]
    x = torch.cat(reference_leaves, dim=1)  # [tokens, n_up]
    dense = torch.zeros(n_features, n_up, *shape[2:], dtype=torch.float64)
    dense = dense.index_put((torch.arange(n_features)[:, None].expand(-1, C), indices), reference_weights)
    expected = torch.einsum("tj,fj...->tf...", x, dense)
    torch.testing.assert_close(got, expected)
    cotangent = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    (got * cotangent).sum().backward()
    (expected * cotangent).sum().backward()
    torch.testing.assert_close(weights.grad, reference_weights.grad)
    for ours, theirs, x in zip(leaves, reference_leaves, upstream):
        active = x != 0  # the gradient of TopK codes only matters where they are active
        torch.testing.assert_close(ours.grad[active], theirs.grad[active])


def test_top_c_and_connection_files(tmp_path, eager_model):
    """Selected rows come strongest first, so the top C of a larger selection is the selection at C; scores and
    totals survive a save / load round trip."""
    from dictionary_learning.scae import all_connections, load_connections, save_connections, select_connections
    from dictionary_learning.scae import virtual_weights

    suite = make_suite(eager_model, n_layer=2)
    texts = random_texts(4, seed=32, max_words=6)
    wide = select_connections(suite, eager_model, texts, 12, ctx_len=CTX)
    narrow = select_connections(suite, eager_model, texts, 3, ctx_len=CTX)
    for name in ("mlp_0", "attn_1", "mlp_1"):
        assert torch.equal(wide.top(3).indices[name], narrow.indices[name])
        assert (wide.scores[name][:, :-1] >= wide.scores[name][:, 1:]).all()
        assert (wide.scores[name].sum(1) <= wide.totals[name] * (1 + 1e-5)).all()
        # the virtual weights of a subset equal the matching entries of C = all (the two contraction orders agree)
        full = all_connections(suite, eager_model)
        rows = torch.arange(suite[name].dict_size)[:, None]
        torch.testing.assert_close(wide.weights[name], full.weights[name][rows, wide.indices[name]])
        torch.testing.assert_close(virtual_weights(suite, eager_model, name, wide.indices[name]), wide.weights[name])
    save_connections(wide, tmp_path / "c.safetensors")
    loaded = load_connections(tmp_path / "c.safetensors")
    for field in ("indices", "weights", "scores", "totals"):
        for name, tensor in getattr(wide, field).items():
            assert torch.equal(getattr(loaded, field)[name], tensor), (field, name)
    with pytest.raises(ValueError, match="C must be a positive int, got -1"):
        wide.top(-1)


def test_evaluate_suite_module_metrics(eager_model):
    """attn_0 reads the clean model's first attention output (nothing is patched before it), so its dense FVU and
    L0 can be computed from a plain forward hook; with C = all the pruned metrics equal the dense ones."""
    from dictionary_learning.scae import all_connections, evaluate_suite

    suite = make_suite(eager_model, n_layer=2)
    texts = random_texts(5, seed=33, max_words=6)
    result = evaluate_suite(suite, eager_model, texts, all_connections(suite, eager_model), batch_size=2, ctx_len=CTX)
    captured = []
    adapter, torch_model = get_adapter(eager_model), eager_model._module
    attn = torch_model.get_submodule(f"{adapter.block(0)}.{adapter.attn}")
    handle = attn.register_forward_hook(lambda m, a, out: captured.append(out[0][0]))
    try:
        with torch.no_grad():
            for text in texts:
                ids = eager_model.tokenizer(text, return_tensors="pt", truncation=True, max_length=CTX)["input_ids"]
                torch_model(ids)
    finally:
        handle.remove()
    target = torch.cat(captured)  # [tokens, d_model]
    with torch.no_grad():
        codes = suite["attn_0"].encode(target)
        fvu = (suite["attn_0"].decode(codes) - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    metrics = result["modules"]
    assert metrics["attn_0"]["fvu_dense"] == pytest.approx(fvu.item(), rel=1e-4)
    assert metrics["attn_0"]["l0_dense"] == pytest.approx((codes > 0).sum(-1).float().mean().item())
    for name in suite.names:
        assert metrics[name]["fvu_pruned"] == pytest.approx(metrics[name]["fvu_dense"], rel=1e-4)
        assert metrics[name]["l0_pruned"] == pytest.approx(metrics[name]["l0_dense"])
        assert 0 < metrics[name]["l0_dense"] <= suite[name].k
    assert result["ce_pruned"] == pytest.approx(result["ce_dense"], abs=1e-4)


@pytest.mark.parametrize("shared", [True, False])
def test_gather_dot_gradients(shared, monkeypatch):
    """The blocked gather-and-dot behind the virtual weights: forward against a direct einsum, backward with
    gradcheck (blocks of 2 rows, so several blocks and index_add collisions are exercised)."""
    from dictionary_learning.scae import _GatherDot

    monkeypatch.setattr(_GatherDot, "CHUNK", 2)
    generator = torch.Generator().manual_seed(7)
    A = torch.randn(5, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    B = torch.randn(*((6, 4) if shared else (6, 3, 4)), generator=generator, dtype=torch.float64, requires_grad=True)
    index = torch.randint(6, (5, 3), generator=generator)
    expected = torch.einsum("fhd,fcd->fch" if shared else "fhd,fchd->fch", A, B[index])
    torch.testing.assert_close(_GatherDot.apply(A, B, index), expected)
    assert torch.autograd.gradcheck(lambda a, b: _GatherDot.apply(a, b, index), (A, B))


@pytest.mark.slow
def test_smollm2_decomposition_and_all_connections():
    """On the real SmolLM2 (RoPE, 9 query heads over 3 key-value heads, RMSNorm): the decomposition equals every
    module's dense pre-activation, and the pruned pass with every connection kept reproduces the recorded codes."""
    from dictionary_learning.scae import all_connections, pruned_forward

    model = load_model("smollm2-135m", attn_implementation="eager")
    suite = SCAESuite.random(model, dict_size=128, k=8, n_layer=2, seed=0)
    record, _ = run_suite(suite, model, ["def add(a, b):\n    return a + b", "The cat sat on the mat."], ctx_len=16)
    mask = record.mask
    for name in suite.names:
        module = suite[name]
        x = record.encoder_inputs[name]
        dense = F.linear(x if module.transcoder else x - module.b_dec, module.encoder.weight, module.encoder.bias)
        total = sum(decompose(suite, model, record, name).values())
        torch.testing.assert_close(total[mask], dense[mask], atol=1e-4, rtol=1e-4, msg=name)
    codes = pruned_forward(suite, model, record, all_connections(suite, model))
    for name in suite.names:
        torch.testing.assert_close(codes[name][mask], record.codes[name][mask], atol=1e-4, rtol=1e-4, msg=name)


def test_scae_command(tmp_path, capsys):
    """`python -m dictionary_learning scae` on a saved suite: a C beyond every upstream count gives the dense suite's
    CE, a small C does not, and the suite's own connections (all of them here) give the dense CE too."""
    import json
    import re

    from dictionary_learning.__main__ import main
    from dictionary_learning.scae import all_connections

    model = load_model("tiny-llama", attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    suite.model_name = "tiny-llama"
    suite.connections = all_connections(suite, model)
    suite.save(tmp_path / "suite")
    main(["scae", "--suite", str(tmp_path / "suite"), "--Cs", "2,10000", "--selection-texts", "4", "--eval-texts", "4",
          "--batch-texts", "2", "--ctx-len", str(CTX), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "ce_versus_c.json").read_text())
    assert [r["C"] for r in rows] == [2, 10000]
    assert rows[1]["ce_pruned"] == pytest.approx(rows[1]["ce_dense"], abs=1e-4)
    assert rows[0]["ce_pruned"] != pytest.approx(rows[0]["ce_dense"], abs=1e-3)
    own = re.search(r"own connections \(C = 288\): CE clean ([\d.]+), dense ([\d.]+), pruned ([\d.]+)", printed)
    assert own and own.group(2) == own.group(3)
    for name in ("ce_versus_c.png", "connections.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--Cs must be comma-separated integers, got '1,x'"):
        main(["scae", "--suite", str(tmp_path / "suite"), "--Cs", "1,x"])

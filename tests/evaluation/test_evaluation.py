"""Evaluation against plain-PyTorch references: forward hooks that patch the module, CE computed per
text."""

import math

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning import ActivationBuffer, hook
from dictionary_learning.dictionary import AutoEncoderTopK
from dictionary_learning.evaluation import evaluate, patched_losses, reconstruction_metrics

from ..helpers import random_texts

CTX = 32


def reference_ce(model, texts, module_path, replace=None, replace_input=False):
    """Mean next-token CE over all real tokens, each text run alone, with an optional forward hook
    that replaces the module's output (or input) by replace(value)."""
    torch_model = model._module
    module = torch_model.get_submodule(module_path)
    handle = None
    if replace is not None and replace_input:
        handle = module.register_forward_pre_hook(lambda m, args: (replace(args[0]), *args[1:]))
    elif replace is not None:
        def output_hook(m, args, out):
            if isinstance(out, tuple):
                return (replace(out[0]), *out[1:])
            return replace(out)
        handle = module.register_forward_hook(output_hook)
    losses, logits_list = [], []
    try:
        with torch.no_grad():
            for text in texts:
                ids = model.tokenizer(text, return_tensors="pt", truncation=True,
                                      max_length=CTX)["input_ids"]
                logits = torch_model(ids).logits[0]
                losses.append(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none"))
                logits_list.append(logits)
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(losses).mean().item(), logits_list


def make_dictionary(d_in, d_out=None, seed=0):
    torch.manual_seed(seed)
    transcoder = d_out is not None
    return AutoEncoderTopK(d_in, 4 * d_in, 8, output_dim=d_out, transcoder=transcoder)


@pytest.mark.parametrize("site", ["resid", "attn_out", "mlp_out"])
def test_sae_loss_recovered_matches_hook_reference(tiny_model, site):
    texts = random_texts(6, seed=11)
    point = hook(tiny_model, 1, site)
    d = tiny_model._module.config.hidden_size
    ae = make_dictionary(d)
    got = patched_losses(texts, tiny_model, ae, (point,), ctx_len=CTX)
    flat = lambda v: ae(v.reshape(-1, d)).reshape(v.shape)  # noqa: E731
    clean, clean_logits = reference_ce(tiny_model, texts, point.path)
    patched, patched_logits = reference_ce(tiny_model, texts, point.path, replace=flat)
    zero, _ = reference_ce(tiny_model, texts, point.path, replace=torch.zeros_like)
    assert got["ce_clean"] == pytest.approx(clean, abs=1e-4)
    assert got["ce_patched"] == pytest.approx(patched, abs=1e-4)
    assert got["ce_zero"] == pytest.approx(zero, abs=1e-4)
    assert got["frac_recovered"] == pytest.approx((zero - patched) / (zero - clean), abs=1e-3)
    kl = torch.cat([(F.softmax(c, -1) * (F.log_softmax(c, -1) - F.log_softmax(p, -1))).sum(-1)
                    for c, p in zip(clean_logits, patched_logits)]).mean().item()
    assert got["kl_patched"] == pytest.approx(kl, abs=1e-4)
    assert got["ce_patched"] != pytest.approx(clean, abs=1e-3)  # the patch did something


def test_transcoder_replaces_mlp_output_from_its_input(tiny_llama):
    texts = random_texts(5, seed=12)
    points = (hook(tiny_llama, 2, "mlp_in"), hook(tiny_llama, 2, "mlp_out"))
    transcoder = make_dictionary(64, 64, seed=1)
    got = patched_losses(texts, tiny_llama, transcoder, points, ctx_len=CTX)
    mlp = tiny_llama._module.model.layers[2].mlp
    handle = mlp.register_forward_hook(lambda m, args, out:
                                       transcoder(args[0].reshape(-1, 64)).reshape(out.shape))
    try:
        patched, _ = reference_ce(tiny_llama, texts, "model.layers.2.mlp")
    finally:
        handle.remove()
    assert got["ce_patched"] == pytest.approx(patched, abs=1e-4)


def test_perfect_dictionary_recovers_everything(tiny_gpt2):
    """An identity 'dictionary' patches in the clean value: CE unchanged, frac_recovered 1, KL 0."""
    class Identity(AutoEncoderTopK):
        def forward(self, x, output_features=False):
            return (x, x) if output_features else x

    texts = random_texts(4, seed=13)
    got = patched_losses(texts, tiny_gpt2, Identity(48, 96, 4), (hook(tiny_gpt2, 1, "resid"),),
                         ctx_len=CTX)
    assert got["ce_patched"] == pytest.approx(got["ce_clean"], abs=1e-5)
    assert got["frac_recovered"] == pytest.approx(1.0, abs=1e-4) and abs(got["kl_patched"]) < 1e-5


def test_reconstruction_metrics_against_numpy_style_reference():
    ae = make_dictionary(16, seed=3)
    x = torch.randn(50, 16)
    got = reconstruction_metrics(ae, x)
    with torch.no_grad():
        x_hat, f = ae(x, output_features=True)
    fvu = ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()
    assert got["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert got["l0"] == pytest.approx(8.0)
    cos = sum(float(a @ b / (a.norm() * b.norm())) for a, b in zip(x, x_hat)) / 50
    assert got["cossim"] == pytest.approx(cos, rel=1e-5)


def test_evaluate_with_buffer(tiny_llama):
    texts = random_texts(40, seed=14)
    buffer = ActivationBuffer(iter(texts), tiny_llama, hook(tiny_llama, 1, "resid"), n_ctxs=8,
                              ctx_len=CTX, refresh_batch_size=4, out_batch_size=64, remove_bos=True)
    results = evaluate(make_dictionary(64), buffer, max_len=CTX, batch_size=4, n_batches=2)
    for key in ("mse", "fvu", "cossim", "l2_ratio", "l0", "frac_alive", "ce_clean", "ce_patched",
                "ce_zero", "frac_recovered", "kl_patched", "frac_variance_explained"):
        assert key in results and math.isfinite(results[key]), key
    assert results["l0"] == pytest.approx(8.0) and 0 < results["frac_alive"] <= 1
    # iterators of plain tensors give the reconstruction metrics only
    plain = evaluate(make_dictionary(64), iter([torch.randn(32, 64)]), n_batches=3)
    assert "ce_clean" not in plain and plain["tokens"] == 32


def test_patched_runs_skip_the_blocks_before_the_hook_point(tiny_llama):
    """The blocks before the hooked one run once (in the clean run); the patched and ablated runs
    start from that output, and give what whole forwards give."""
    texts = random_texts(4, seed=15)
    point = hook(tiny_llama, 2, "resid")
    ae = make_dictionary(64, seed=4)
    calls = {0: 0, 2: 0}  # MLP calls: an MLP runs only where its block's forward runs
    handles = [tiny_llama._module.model.layers[i].mlp.register_forward_hook(
        lambda m, args, out, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls]
    try:
        reused = patched_losses(texts, tiny_llama, ae, (point,), ctx_len=CTX, mean_ablation=True)
        assert calls == {0: 1, 2: 4}
        whole = patched_losses(texts, tiny_llama, ae, (point,), ctx_len=CTX, mean_ablation=True,
                               reuse_prefix=False)
        assert calls == {0: 5, 2: 8}
    finally:
        for handle in handles:
            handle.remove()
    assert reused == pytest.approx(whole, abs=1e-6)


def test_run_refuses_to_skip_a_module_after_a_hook_point(tiny_llama):
    from dictionary_learning.tracing import run, tokenize

    encoding = tokenize(tiny_llama.tokenizer, random_texts(1, seed=16), CTX)
    with pytest.raises(ValueError, match="model.layers.2 runs after the hook point"):
        run(tiny_llama, encoding, read=[hook(tiny_llama, 1, "resid")],
            skip={"model.layers.2": torch.zeros(1)})


def test_evaluate_without_mean_ablation_drops_only_its_keys(tiny_llama):
    def results(mean_ablation):
        buffer = ActivationBuffer(iter(random_texts(40, seed=17)), tiny_llama,
                                  hook(tiny_llama, 1, "resid"), n_ctxs=8, ctx_len=CTX,
                                  refresh_batch_size=4, out_batch_size=64, remove_bos=True)
        return evaluate(make_dictionary(64), buffer, max_len=CTX, batch_size=4, n_batches=2,
                        mean_ablation=mean_ablation)

    full, fast = results(True), results(False)
    assert {"ce_mean", "kl_mean", "frac_recovered_mean"} <= set(full) - set(fast)
    assert not [key for key in fast if key.endswith("_mean")]
    for key in ("ce_clean", "ce_patched", "ce_zero", "kl_patched", "frac_recovered", "fvu"):
        assert fast[key] == pytest.approx(full[key], abs=1e-6), key


def test_top_contexts_stop_after_the_tokens_asked_for(tiny_llama):
    from dictionary_learning.evaluation import top_activating_contexts

    texts, point, ae = random_texts(12, seed=18), hook(tiny_llama, 1, "resid"), make_dictionary(64)
    features = list(range(16))
    first_batch = top_activating_contexts(ae, tiny_llama, point, texts[:4], features, ctx_len=CTX,
                                          batch_size=4, progress=False)
    limited = top_activating_contexts(ae, tiny_llama, point, texts, features, ctx_len=CTX,
                                      batch_size=4, progress=False, tokens=1)
    every = top_activating_contexts(ae, tiny_llama, point, texts, features, ctx_len=CTX,
                                    batch_size=4, progress=False)
    assert limited == first_batch and every != first_batch


def test_fvu_on_all_and_on_typical_tokens_against_float64():
    """One massive token per batch: fvu_all_tokens counts it, fvu_typical_tokens leaves it out
    (norm > 10 x its batch's median), both about the mean of the tokens they cover."""
    torch.manual_seed(5)
    ae = make_dictionary(16, seed=5)
    batches = [torch.randn(64, 16) for _ in range(3)]
    for batch in batches:
        batch[7] *= 100
    got = evaluate(ae, iter(batches), n_batches=3)
    x = torch.cat(batches).double()
    with torch.no_grad():
        errors = torch.cat([(b - ae(b)).double().pow(2).sum(-1) for b in batches])
    typical = torch.cat([b.norm(dim=-1) <= 10 * b.norm(dim=-1).median() for b in batches])

    def fvu(rows):
        return float(errors[rows].sum() / (x[rows] - x[rows].mean(0)).pow(2).sum())

    everything = torch.ones(len(x), dtype=torch.bool)
    assert got["fvu_all_tokens"] == pytest.approx(fvu(everything), rel=1e-5)
    assert got["fvu_typical_tokens"] == pytest.approx(fvu(typical), rel=1e-5)
    assert got["typical_tokens_excluded"] == 3 == int((~typical).sum())
    assert got["explained_variance"] == pytest.approx(1 - fvu(everything), rel=1e-5)
    centred = torch.cat([(b - b.mean(0)).double().pow(2).sum(-1) for b in batches])
    assert got["explained_variance_per_token_median"] == pytest.approx(
        float((1 - errors / centred).median()), abs=1e-5)

"""Progress on stderr: every long phase shows a bar titled with what it does (here with the delay
lowered to 0, so even tiny phases show theirs), short phases stay quiet at the default delay, and
progress=False writes nothing; the quickstart prints a line as each phase starts and times it."""

import pytest
import torch

import dictionary_learning.progress as progress_module
from dictionary_learning import ActivationBuffer, AutoEncoderTopK, load_model
from dictionary_learning.cache import write_cache
from dictionary_learning.dashboard import build_dashboard
from dictionary_learning.evaluation import (
    evaluate,
    feature_density,
    patched_losses,
    top_activating_contexts,
)
from dictionary_learning.models import d_model, hook
from dictionary_learning.pytorch_buffer import ActivationBuffer as TorchActivationBuffer
from dictionary_learning.reports import quickstart
from dictionary_learning.scae import ce_versus_c, select_connections

from ..helpers import CTX, make_suite, random_texts

TEXTS = random_texts(24, seed=3, max_words=20)


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(progress_module, "DELAY", 0.0)


@pytest.fixture(scope="module")
def sae(tiny_gpt2):
    torch.manual_seed(0)
    return AutoEncoderTopK(d_model(tiny_gpt2), 64, 4)


def buffer(model, shown):
    return ActivationBuffer(iter(TEXTS), model, hook(model, 1, "resid"), n_ctxs=8, ctx_len=16,
                            refresh_batch_size=4, out_batch_size=32, progress=shown)


def check(capsys, run, *titles):
    """run(True) writes a bar with each title to stderr; run(False) writes nothing there."""
    capsys.readouterr()
    run(True)
    err = capsys.readouterr().err
    for title in titles:
        assert title in err, f"no {title!r} bar on stderr:\n{err}"
    run(False)
    assert capsys.readouterr().err == ""


def test_buffer_fills(tiny_gpt2, no_delay, capsys):
    def run(shown):
        next(buffer(tiny_gpt2, shown))
        torch_buffer = TorchActivationBuffer(iter(TEXTS), tiny_gpt2, "transformer.h.1", n_ctxs=8,
                                             ctx_len=16, refresh_batch_size=4, out_batch_size=32,
                                             progress=shown)
        next(torch_buffer)

    check(capsys, run, "filling ActivationBuffer (layers.1.resid)",
          "filling ActivationBuffer (transformer.h.1 output)")


def test_evaluate_with_loss_batches(tiny_gpt2, sae, no_delay, capsys):
    point = hook(tiny_gpt2, 1, "resid")

    def run(shown):
        evaluate(sae, buffer(tiny_gpt2, shown), max_len=16, batch_size=4, n_batches=1,
                 loss_batches=2, progress=shown)
        patched_losses(TEXTS[:4], tiny_gpt2, sae, hooks=(point,), ctx_len=16, progress=shown)
        feature_density(sae, [torch.randn(32, d_model(tiny_gpt2))], progress=shown)

    # one activation batch and two loss batches: the bar's total, reached
    check(capsys, run, "evaluating AutoEncoderTopK", "3/3",
          "loss recovered (clean, patch, zero runs", "feature density")


def test_phases_shorter_than_the_delay_stay_quiet(tiny_gpt2, sae, capsys, monkeypatch):
    """A sweep's short evaluate calls print nothing (DELAY raised so a busy machine can't flake)."""
    monkeypatch.setattr(progress_module, "DELAY", 30.0)
    capsys.readouterr()
    evaluate(sae, buffer(tiny_gpt2, True), max_len=16, batch_size=4, n_batches=1, loss_batches=1)
    assert capsys.readouterr().err == ""


def test_top_contexts_cache_and_dashboard(tiny_gpt2, sae, tmp_path, no_delay, capsys):
    point = hook(tiny_gpt2, 1, "resid")

    def run(shown):
        top_activating_contexts(sae, tiny_gpt2, point, TEXTS, [0, 1, 2], ctx_len=16, batch_size=8,
                                progress=shown)
        write_cache(tiny_gpt2, TEXTS, point, tmp_path / f"cache_{shown}", 200, ctx_len=16,
                    batch_texts=4, progress=shown)
        build_dashboard(sae, tiny_gpt2, point, TEXTS, tmp_path / f"dashboard_{shown}", features=5,
                        tokens=200, ctx_len=16, batch_texts=8, progress=shown)

    check(capsys, run, "top contexts of 3 features on 24 texts",
          "writing activation cache (cache_True)", "dashboard: reading activations of 5 features",
          "dashboard: feature records", "dashboard: writing feature files")


def test_top_contexts_of_no_features(tiny_gpt2, sae):
    """An empty feature list (the quickstart's --n-features 0) gives no contexts, no IndexError."""
    point = hook(tiny_gpt2, 1, "resid")
    assert top_activating_contexts(sae, tiny_gpt2, point, TEXTS[:4], [], ctx_len=16) == {}


def test_scae_selection_and_evaluation(no_delay, capsys):
    model = load_model("tiny-gpt2", attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    texts = random_texts(4, seed=24, max_words=6)

    def run(shown):
        selected = select_connections(suite, model, texts, 4, batch_size=2, ctx_len=CTX,
                                      progress=shown)
        ce_versus_c(suite, model, None, texts, [2, 4], batch_size=2, ctx_len=CTX, progress=shown,
                    connections=selected)

    check(capsys, run, "contribution statistics on 4 texts", "selecting the top 4 connections",
          "CE against C (2 values) on 4 texts")


SMALL = dict(model="tiny-gpt2", steps=3, tokens=400, batch=64, d_sae=64, k=4, eval_texts=8,
             eval_tokens=128, ctx_len=32, loss_batches=1, n_features=1)
PHASES = {  # the line each phase starts with, and the seconds it records
    "loading tiny-gpt2 ...": None,
    "collecting 400 training tokens ...": "seconds_collect",
    "evaluating on 128 held-out tokens ...": "seconds_evaluate",
    "loss recovered over 1 batches of 16 held-out texts ...": "seconds_loss_recovered",
    "feature density on 128 held-out tokens ...": "seconds_feature_density",
    "top contexts of 1 features on 128 held-out tokens ...": "seconds_top_contexts",
    "dashboard: 10 features on up to 8,192 held-out tokens ...": "seconds_dashboard",
}


def test_quickstart_prints_and_times_every_phase(tmp_path, capsys):
    capsys.readouterr()
    metrics = quickstart(**SMALL, dashboard_features=10, out=tmp_path / "q")
    err = capsys.readouterr().err
    positions = []
    for line, key in PHASES.items():
        assert line in err, f"no phase line {line!r}:\n{err}"
        positions.append(err.index(line))
        if key is not None:
            assert 0 < metrics[key] < metrics["seconds_total"]
    assert positions == sorted(positions), "phase lines out of order"
    assert metrics["seconds_train"] > 0


# no buffer warning about sizes the caller never chose
@pytest.mark.filterwarnings("error::UserWarning")
def test_quickstart_without_progress_is_quiet(tmp_path, capsys):
    capsys.readouterr()
    metrics = quickstart(**SMALL, dashboard_features=0, out=tmp_path / "q", progress=False)
    assert capsys.readouterr().err == ""
    assert metrics["seconds_evaluate"] > 0 and "seconds_dashboard" not in metrics

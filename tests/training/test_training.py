"""Training against planted ground truth; trainSAE's multi-trainer, save / load, resume and error
behaviour."""

import json

import pytest
import torch

from dictionary_learning.dictionary import AutoEncoderTopK, BatchTopKSAE
from dictionary_learning.trainers import BatchTopKTrainer, StandardTrainerAprilUpdate, TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary

from ..helpers import Crash, crashing, fraction_recovered, planted_features, planted_stream

D, N_TRUE, K = 32, 128, 3


def topk_config(steps, **overrides):
    config = dict(trainer=TopKTrainer, dict_class=AutoEncoderTopK, activation_dim=D,
                  dict_size=2 * N_TRUE, k=K, lr=2e-3, steps=steps, warmup_steps=20, seed=0,
                  dead_feature_threshold=20_000)
    config.update(overrides)
    return config


@pytest.mark.slow
def test_topk_sae_recovers_planted_features():
    features = planted_features(N_TRUE, D, seed=0)
    steps = 1000
    [trainer] = trainSAE(planted_stream(features, K, 256, steps, seed=1), [topk_config(steps)],
                         steps, progress=False)
    recovered = fraction_recovered(features, trainer.ae.decoder.weight.detach())
    assert recovered >= 0.9, f"only {recovered:.0%} of planted features recovered at cosine >= 0.9"
    assert trainer.last_metrics["l0"] == K and trainer.last_metrics["fvu"] < 0.2


@pytest.mark.slow
def test_topk_transcoder_recovers_planted_map():
    """x = codes @ F_in, y = codes @ F_out: the transcoder's decoder must find F_out's
    directions."""
    features_in, features_out = (planted_features(N_TRUE, D, seed=0),
                                 planted_features(N_TRUE, 24, seed=5))
    steps = 1500
    config = topk_config(steps, output_dim=24, transcoder=True)
    stream = planted_stream(features_in, K, 256, steps, seed=2, features_out=features_out)
    [trainer] = trainSAE(stream, [config], steps, progress=False)
    recovered = fraction_recovered(features_out, trainer.ae.decoder.weight.detach())
    assert recovered >= 0.9, (f"only {recovered:.0%} of planted output features recovered at "
                              "cosine >= 0.9")


@pytest.mark.slow
@pytest.mark.parametrize("trainer_class", [BatchTopKTrainer, StandardTrainerAprilUpdate])
def test_other_trainers_learn(trainer_class):
    features = planted_features(N_TRUE, D, seed=0)
    steps = 1000
    if trainer_class is StandardTrainerAprilUpdate:
        config = dict(trainer=StandardTrainerAprilUpdate, activation_dim=D, dict_size=2 * N_TRUE,
                      lr=2e-3, l1_penalty=1.0, steps=steps, warmup_steps=20,
                      sparsity_warmup_steps=100, seed=0)
    else:  # per-token TopK for the first half: batch top-k from the start leaves latents dead
        config = topk_config(steps, trainer=BatchTopKTrainer, dict_class=BatchTopKSAE,
                             threshold_start_step=100, token_topk_steps=steps // 2)
    [trainer] = trainSAE(planted_stream(features, K, 256, steps, seed=1), [config], steps,
                         progress=False)
    assert trainer.last_metrics["fvu"] < 0.3
    assert fraction_recovered(features, trainer.ae.decoder.weight.detach()) >= 0.9
    # the inference threshold is tracked and gives about k codes per token
    if trainer_class is BatchTopKTrainer:
        assert trainer.ae.threshold > 0
        x = next(planted_stream(features, K, 512, 1, seed=9))
        l0 = (trainer.ae.encode(x) > 0).sum(-1).float().mean()
        assert K / 2 <= l0 <= 2 * K


def test_multi_trainer_equals_separate_runs():
    features = planted_features(N_TRUE, D, seed=0)
    configs = [topk_config(30, seed=0), topk_config(30, seed=1, k=5, lr=1e-3)]
    together = trainSAE(planted_stream(features, K, 64, 30, seed=3), configs, 30, progress=False)
    for config, trained in zip(configs, together):
        [alone] = trainSAE(planted_stream(features, K, 64, 30, seed=3), [config], 30,
                           progress=False)
        for (name, a), b in zip(alone.ae.state_dict().items(), trained.ae.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("normalize", [False, True])
def test_resume_equals_uninterrupted(tmp_path, normalize):
    features = planted_features(N_TRUE, D, seed=0)
    steps, configs = 24, [topk_config(24, dead_feature_threshold=500), topk_config(24, seed=3, k=4)]
    kwargs = dict(normalize_activations=normalize, normalization_batches=2, progress=False)
    straight = trainSAE(planted_stream(features, K, 64, 40, seed=4), configs, steps,
                        save_dir=tmp_path / "a", **kwargs)
    with pytest.raises(Crash):
        trainSAE(crashing(planted_stream(features, K, 64, 40, seed=4), after=17), configs, steps,
                 save_dir=tmp_path / "b", checkpoint_steps=5, **kwargs)
    # all trainers, one file
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert 0 < state["step"] < steps
    resumed = trainSAE(planted_stream(features, K, 64, 40, seed=4), configs, steps,
                       save_dir=tmp_path / "b", resume=True, **kwargs)
    for a, b in zip(straight, resumed):
        for (name, x), y in zip(a.ae.state_dict().items(), b.ae.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    for i in range(2):
        saved_a, _ = load_dictionary(tmp_path / "a" / f"trainer_{i}")
        saved_b, _ = load_dictionary(tmp_path / "b" / f"trainer_{i}")
        for x, y in zip(saved_a.state_dict().values(), saved_b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_saved_dictionary_round_trips_and_folds_normalisation(tmp_path):
    features = planted_features(N_TRUE, D, seed=0)
    stream = (x * 7.0 for x in planted_stream(features, K, 64, 60, seed=6))  # far from unit scale
    [trainer] = trainSAE(stream, [topk_config(40, lm_name="planted", layer=0)], 40,
                         save_dir=tmp_path, normalize_activations=True, normalization_batches=4,
                         progress=False)
    loaded, config = load_dictionary(tmp_path / "trainer_0")
    assert (config["trainer"]["trainer_class"] == "TopKTrainer"
            and config["trainer"]["dict_class"] == "AutoEncoderTopK")
    assert config["trainer"]["k"] == K and config["trainer"]["lm_name"] == "planted"
    scale = config["trainer"]["normalization_scales"][0]
    assert 0.01 < scale < 0.5
    raw = next(planted_stream(features, K, 32, 1, seed=7)) * 7.0
    # the saved dictionary works on raw activations: loaded(x) == trained(scale * x) / scale
    torch.testing.assert_close(loaded(raw), trainer.ae(raw * scale) / scale, atol=1e-4, rtol=1e-4)
    # ae.pt and model.safetensors hold the same weights; upstream's class method loads ae.pt too
    from safetensors.torch import load_file
    pt = torch.load(tmp_path / "trainer_0" / "ae.pt", weights_only=True)
    st = load_file(str(tmp_path / "trainer_0" / "model.safetensors"))
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    again = AutoEncoderTopK.from_pretrained(tmp_path / "trainer_0" / "ae.pt")
    torch.testing.assert_close(again(raw), loaded(raw))
    assert not list(tmp_path.rglob("*.tmp"))


def test_upstream_format_loads(tmp_path):
    """An ae.pt + config.json as upstream writes them (older TopK saves have no threshold
    buffer)."""
    ae = AutoEncoderTopK(8, 16, 2)
    state = {k: v for k, v in ae.state_dict().items() if k != "threshold"}
    torch.save(state, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {
        "trainer_class": "TopKTrainer", "dict_class": "AutoEncoderTopK", "activation_dim": 8,
        "dict_size": 16, "k": 2, "lr": 1e-3, "steps": 10, "seed": 0, "layer": 3, "lm_name": "x",
        "submodule_name": "resid_3",
        "device": "cuda:0", "wandb_name": "t"}, "buffer": {"d_submodule": 8, "io": "out",
                                                           "n_ctxs": 10, "ctx_len": 128,
                                                           "refresh_batch_size": 4,
                                                           "out_batch_size": 8,
                                                           "device": "cuda:0"}}))
    loaded, config = load_dictionary(tmp_path)
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x), ae(x))
    assert config["buffer"]["io"] == "out"


@pytest.mark.parametrize("case,error,match", [
    ("width", ValueError, r"expected input width 32, got shape \(64, 31\)"),
    ("nan", ValueError, "NaN / inf"),
    ("inf", ValueError, "NaN / inf"),
    ("k", ValueError, r"k must be an int in \[1, dict_size=256\], got 300"),
    ("key", ValueError, r"unknown TopKTrainer config keys \['learning_rate'\]"),
    ("trainer", ValueError, "unknown trainer 'TopK'"),
    ("pairs", ValueError, "transcoder: batches must be"),
])
def test_bad_input_raises_and_leaves_saves_intact(tmp_path, case, error, match):
    features = planted_features(N_TRUE, D, seed=0)
    trainSAE(planted_stream(features, K, 64, 5, seed=1), [topk_config(5)], 5, save_dir=tmp_path,
             progress=False)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    config, stream = topk_config(5), list(planted_stream(features, K, 64, 5, seed=2))
    if case == "width":
        stream = [x[:, :31] for x in stream]
    elif case in ("nan", "inf"):
        stream[3][5, 7] = float("nan") if case == "nan" else float("inf")
    elif case == "k":
        config["k"] = 300
    elif case == "key":
        config["learning_rate"] = config.pop("lr")
    elif case == "trainer":
        config["trainer"] = "TopK"
    elif case == "pairs":
        config.update(transcoder=True)
    with pytest.raises(error, match=match):
        trainSAE(iter(stream), [config], 5, save_dir=tmp_path, checkpoint_steps=100, progress=False)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_wandb_offline_logging(tmp_path, monkeypatch):
    """use_wandb=True works with no network (offline mode) and writes the run locally."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    features = planted_features(N_TRUE, D, seed=0)
    trainSAE(planted_stream(features, K, 64, 6, seed=1), [topk_config(6)], 6, save_dir=tmp_path,
             use_wandb=True, log_steps=2, progress=False)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))

"""Upstream's ReLU family: AutoEncoder (normalize_decoder, scale_biases, ghost mode,
from_pretrained), AutoEncoderNew, IdentityDict, the trainer helpers (schedules, unit-norm decoder
geometry, ConstrainedAdam) and both StandardTrainers (losses and gradients against float64
references, resampling, planted recovery, resume)."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, IdentityDict
from dictionary_learning.trainers import StandardTrainer, StandardTrainerAprilUpdate
from dictionary_learning.trainers.standard import resample_dead_neurons
from dictionary_learning.trainers.trainer import (
    ConstrainedAdam,
    get_lr_schedule,
    get_sparsity_warmup_fn,
    remove_gradient_parallel_to_decoder_directions,
    set_decoder_norm_to_unit_norm,
)
from dictionary_learning.training import build_trainer, trainSAE
from dictionary_learning.utils import load_dictionary, save_dictionary

from ..helpers import Crash, crashing, fraction_recovered, planted_features, planted_stream

D, N_TRUE, K = 32, 128, 3


def randomised(module, seed=0, scale=0.5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes run fastest on one thread (and are not slowed down by a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------------
# AutoEncoder


def relu_sae_reference(W_enc, b_enc, W_dec, b_dec, x):
    """f = relu(W_enc (x - b_dec) + b_enc), x_hat = W_dec f + b_dec, from plain tensors."""
    f = F.relu((x - b_dec) @ W_enc.t() + b_enc)
    return f @ W_dec.t() + b_dec, f


def test_autoencoder_forward_and_ghost_mode_match_reference():
    ae = randomised(AutoEncoder(6, 10).double())
    x, mask = rand(5, 6), (rand(5, 10, seed=1) > 0).double()
    x_hat, f = relu_sae_reference(ae.encoder.weight, ae.encoder.bias, ae.decoder.weight, ae.bias, x)
    torch.testing.assert_close(ae(x), x_hat)
    got_hat, got_f = ae(x, output_features=True)
    torch.testing.assert_close(got_hat, x_hat)
    torch.testing.assert_close(got_f, f)
    pre = (x - ae.bias) @ ae.encoder.weight.t() + ae.encoder.bias
    ghost = (torch.exp(pre) * mask) @ ae.decoder.weight.t()  # no bias
    got_hat, got_ghost, got_f = ae(x, output_features=True, ghost_mask=mask)
    for got, want in ((got_hat, x_hat), (got_ghost, ghost), (got_f, f)):
        torch.testing.assert_close(got, want)
    assert len(ae(x, ghost_mask=mask)) == 2


def test_autoencoder_init_is_tied_with_decoder_columns_of_norm_point_one():
    torch.manual_seed(0)
    ae = AutoEncoder(8, 20)
    torch.testing.assert_close(ae.decoder.weight.norm(dim=0), torch.full((20,), 0.1))
    torch.testing.assert_close(ae.encoder.weight, ae.decoder.weight.t())
    assert not ae.bias.any() and not ae.encoder.bias.any()


@pytest.mark.parametrize("kwargs", [dict(), dict(output_dim=5, transcoder=True, skip=True)])
def test_normalize_decoder_keeps_outputs_and_scales_features(kwargs):
    ae = randomised(AutoEncoder(6, 12, **kwargs).double())
    with torch.no_grad():
        ae.decoder.weight[:, 3] = 0.0  # a column of norm 0 stays as it is
    old_norms = ae.decoder.weight.norm(dim=0).clone()
    x = rand(7, 6, seed=2)
    old_out, old_f = ae(x, output_features=True)
    ae.normalize_decoder()
    new_out, new_f = ae(x, output_features=True)
    torch.testing.assert_close(new_out, old_out)
    norms = ae.decoder.weight.norm(dim=0)
    torch.testing.assert_close(norms[old_norms > 0], torch.ones(11, dtype=torch.float64))
    assert norms[3] == 0
    alive = old_norms > 0
    torch.testing.assert_close(new_f[:, alive], old_f[:, alive] * old_norms[alive])
    before = copy.deepcopy(ae.state_dict())
    ae.normalize_decoder()  # already unit: nothing moves
    assert all(torch.equal(before[k], v) for k, v in ae.state_dict().items())


def test_scale_biases_makes_the_dictionary_equivariant_to_input_scale():
    ae = randomised(AutoEncoder(6, 12).double())
    enc_bias, bias = ae.encoder.bias.clone(), ae.bias.clone()
    x, s = rand(9, 6, seed=3), 3.5
    old_out, old_f = ae(x, output_features=True)
    ae.scale_biases(s)
    torch.testing.assert_close(ae.encoder.bias, enc_bias * s)
    torch.testing.assert_close(ae.bias, bias * s)
    new_out, new_f = ae(s * x, output_features=True)
    torch.testing.assert_close(new_out, s * old_out)
    torch.testing.assert_close(new_f, s * old_f)


def test_from_pretrained_renormalises_by_default(tmp_path):
    ae = randomised(AutoEncoder(6, 12))
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    x = rand(4, 6, dtype=torch.float32)
    normalised = AutoEncoder.from_pretrained(tmp_path / "ae.pt")
    torch.testing.assert_close(normalised.decoder.weight.norm(dim=0), torch.ones(12))
    torch.testing.assert_close(normalised(x), ae(x), atol=1e-5, rtol=1e-5)
    raw = AutoEncoder.from_pretrained(tmp_path / "ae.pt", normalize_decoder=False,
                                      dtype=torch.float64)
    assert raw.bias.dtype == torch.float64
    assert all(torch.equal(v.float(), ae.state_dict()[k]) for k, v in raw.state_dict().items())


# --------------------------------------------------------------------------------------------------
# AutoEncoderNew and IdentityDict


def test_autoencoder_new_matches_reference_and_round_trips(tmp_path):
    torch.manual_seed(0)
    fresh = AutoEncoderNew(6, 10)
    torch.testing.assert_close(fresh.decoder.weight.norm(dim=0), torch.full((10,), 0.1))
    assert not fresh.decoder.bias.any() and not fresh.encoder.bias.any()
    ae = randomised(AutoEncoderNew(6, 10))
    assert set(ae.state_dict()) == {"encoder.weight", "encoder.bias", "decoder.weight",
                                    "decoder.bias"}
    x = rand(5, 6, seed=4, dtype=torch.float32)
    f = F.relu(x @ ae.encoder.weight.t() + ae.encoder.bias)  # no input centring
    x_hat = f @ ae.decoder.weight.t() + ae.decoder.bias
    torch.testing.assert_close(ae(x), x_hat)
    torch.testing.assert_close(ae.decode(ae.encode(x)), x_hat)
    got_hat, got_f = ae(x, output_features=True)
    torch.testing.assert_close(got_hat, x_hat)
    # upstream: features times column norms
    torch.testing.assert_close(got_f, f * ae.decoder.weight.norm(dim=0))
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    torch.testing.assert_close(AutoEncoderNew.from_pretrained(tmp_path / "ae.pt")(x), x_hat)
    save_dictionary(ae, tmp_path / "saved")
    loaded, config = load_dictionary(tmp_path / "saved")
    assert type(loaded) is AutoEncoderNew and config["trainer"]["dict_class"] == "AutoEncoderNew"
    torch.testing.assert_close(loaded(x), x_hat)
    ae.scale_biases(2.0)
    torch.testing.assert_close(ae(2 * x), 2 * x_hat)


def test_identity_dict(tmp_path):
    x = rand(3, 5, dtype=torch.float32)
    identity = IdentityDict(5)
    assert identity.dict_size == 5 and not list(identity.parameters())
    assert torch.equal(identity(x), x) and torch.equal(identity.decode(identity.encode(x)), x)
    x_hat, f = identity(x, output_features=True)
    assert torch.equal(x_hat, x) and torch.equal(f, x)
    cast = IdentityDict.from_pretrained(5, "unused/path", dtype=torch.float64)
    assert cast.encode(x).dtype == torch.float64 and cast(x).dtype == torch.float64
    # PyPI 0.1.0's call form
    assert IdentityDict.from_pretrained("some/ae.pt").activation_dim is None
    with pytest.raises(ValueError, match="expected input width 5"):
        identity(torch.zeros(2, 4))
    save_dictionary(identity, tmp_path)
    loaded, config = load_dictionary(tmp_path)
    assert type(loaded) is IdentityDict and torch.equal(loaded(x), x)
    assert config["trainer"]["dict_class"] == "IdentityDict"


# --------------------------------------------------------------------------------------------------
# trainer helpers


def test_lr_and_sparsity_schedules():
    lr = get_lr_schedule(100, 10, decay_start=60)
    assert [lr(s) for s in (0, 5, 10, 59, 60, 80, 99)] == [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 1 / 40]
    restarting = get_lr_schedule(100, 4, resample_steps=30)
    assert [restarting(s) for s in (0, 2, 4, 29, 30, 32, 61)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5,
                                                                  0.25]
    sparsity = get_sparsity_warmup_fn(100, 20)
    assert [sparsity(s) for s in (0, 10, 20, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert get_sparsity_warmup_fn(100, None)(0) == get_sparsity_warmup_fn(100, 0)(0) == 1.0
    for call, match in ((lambda: get_lr_schedule(100, 100),
                         "warmup_steps must be < steps=100, got 100"),
                        (lambda: get_lr_schedule(100, 10, decay_start=5),
                         "decay_start must be > warmup_steps"),
                        (lambda: get_lr_schedule(100, 10, 50, resample_steps=20),
                         "cannot both be set"),
                        (lambda: get_lr_schedule(100, 10, 50, sparsity_warmup_steps=60),
                         "sparsity_warmup_steps"),
                        (lambda: get_sparsity_warmup_fn(100, 100),
                         r"sparsity_warmup_steps must be in \[0, ")):
        with pytest.raises(ValueError, match=match):
            call()


def test_trainers_take_warmups_longer_than_the_run():
    """Upstream asserts warmup_steps < steps; here a warmup (lr or sparsity) longer than the run is
    cut to the run, so a short run still reaches its full lr and penalty."""
    trainer = StandardTrainer(steps=50, activation_dim=6, dict_size=12, resample_steps=25_000,
                              lr=1e-3)
    x = rand(8, 6, seed=1, dtype=torch.float32)
    for step in range(3):
        trainer.update(step, x)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 3 / 50)
    assert trainer.sparsity_warmup_fn(40) == pytest.approx(40 / 50)
    with pytest.raises(ValueError, match="decay_start must be >= warmup_steps=1000, got 30"):
        StandardTrainer(steps=50, activation_dim=6, dict_size=12, decay_start=30)


def test_unit_norm_helpers():
    weight = rand(7, 11, seed=5)
    grad = rand(7, 11, seed=6)
    set_decoder_norm_to_unit_norm(weight, 7, 11)
    torch.testing.assert_close(weight.norm(dim=0), torch.ones(11, dtype=torch.float64))
    original = grad.clone()
    remove_gradient_parallel_to_decoder_directions(weight, grad, 7, 11)
    assert (grad * weight).sum(dim=0).abs().max() < 1e-5  # nothing left along the columns
    torch.testing.assert_close(original - grad, (original * weight).sum(0) * weight, atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[activation_dim, d_sae\] = \[11, 7\].*got \(7, 11\)"):
        set_decoder_norm_to_unit_norm(weight, 11, 7)


def test_constrained_adam_equals_projected_adam_and_keeps_unit_norms():
    decoder = torch.nn.Parameter(rand(6, 9, seed=7))
    other = torch.nn.Parameter(rand(4, seed=8))
    with torch.no_grad():
        decoder /= decoder.norm(dim=0)
    ref_decoder, ref_other = (torch.nn.Parameter(decoder.detach().clone()),
                              torch.nn.Parameter(other.detach().clone()))
    optimizer = ConstrainedAdam([decoder, other], [decoder], lr=0.05)
    reference = torch.optim.Adam([ref_decoder, ref_other], lr=0.05)
    for step in range(5):
        for params, opt in (((decoder, other), optimizer), ((ref_decoder, ref_other), reference)):
            opt.zero_grad()
            (params[0].sum(dim=1).pow(2).sum() + (params[1] * rand(4, seed=step)).sum()
             + (params[0] * rand(6, 9, seed=10 + step)).sum()).backward()
        with torch.no_grad():  # reference: project by hand, plain Adam, renormalise by hand
            g, w = ref_decoder.grad, ref_decoder / ref_decoder.norm(dim=0)
            g -= (g * w).sum(0) * w
        optimizer.step()
        reference.step()
        with torch.no_grad():
            ref_decoder /= ref_decoder.norm(dim=0)
        torch.testing.assert_close(decoder.norm(dim=0), torch.ones(9, dtype=torch.float64))
        torch.testing.assert_close(decoder, ref_decoder)
        torch.testing.assert_close(other, ref_other)


# --------------------------------------------------------------------------------------------------
# StandardTrainer and StandardTrainerAprilUpdate


def make_trainer(cls=StandardTrainer, **kwargs):
    config = dict(steps=50, activation_dim=6, dict_size=12, warmup_steps=2, sparsity_warmup_steps=4,
                  seed=0)
    config.update(kwargs)
    return cls(**config)


def founding_entropy_reference(f, eps=1e-8):
    """The founding README's entropy penalty, written out per token in float64."""
    values = []
    for row in f:
        total = row.sum()
        if total > 0:
            p = row / (total + eps)
            values.append(-(p * torch.log(p + eps)).sum())
        else:
            values.append(row.sum() * 0)
    return torch.stack(values).mean()


@pytest.mark.parametrize("case", ["l1", "entropy", "april", "l1-transcoder"])
def test_standard_losses_and_gradients_match_float64_reference(case):
    kwargs = {"entropy": case == "entropy"} if case != "april" else {}
    if case == "l1-transcoder":
        kwargs.update(output_dim=4, transcoder=True, skip=True)
    trainer = make_trainer(StandardTrainerAprilUpdate if case == "april" else StandardTrainer,
                           l1_penalty=0.3, **kwargs)
    ae = randomised(trainer.ae.double())
    x, step = rand(8, 6, seed=11), 2  # halfway through the sparsity warmup: coefficient 0.3 * 2 / 4
    y = rand(8, ae.output_dim, seed=12) if ae.transcoder else x
    params = {name: p.detach().clone().requires_grad_() for name, p in ae.named_parameters()}
    enc_in = x if ae.transcoder else x - params["bias"]
    f = F.relu(enc_in @ params["encoder.weight"].t() + params["encoder.bias"])
    y_hat = f @ params["decoder.weight"].t() + params["bias"]
    if "skip.weight" in params:
        y_hat = y_hat + x @ params["skip.weight"].t()
    mse = ((y - y_hat) ** 2).sum(dim=1).mean()
    if case == "entropy":
        penalty = founding_entropy_reference(f)
    elif case == "april":
        penalty = (f * params["decoder.weight"].norm(dim=0)).sum(dim=1).mean()
    else:
        penalty = f.abs().sum(dim=1).mean()
    want = mse + 0.3 * 0.5 * penalty
    got = trainer.loss(x, step, y=y)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for name, p in ae.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, msg=f"gradient of {name}")
    if not ae.transcoder:  # upstream's call forms: loss(x, step, logging=True), loss(x, step=step)
        log = trainer.loss(x, step, logging=True)
        assert log.losses["loss"] == pytest.approx(want.item()) and log.f.shape == (8, 12)
        assert trainer.loss(x, step=step).item() == pytest.approx(want.item())


def test_entropy_penalty_is_zero_for_one_hot_codes_and_log_n_for_uniform():
    trainer = make_trainer(entropy=True)
    one_hot = torch.eye(12)[:5]
    uniform = torch.full((3, 12), 0.7)
    assert trainer.sparsity_loss(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert (trainer.sparsity_loss(uniform).item()
            == pytest.approx(torch.log(torch.tensor(12.0)).item(), rel=1e-5))
    assert trainer.sparsity_loss(torch.zeros(2, 12)).item() == 0.0


def test_standard_trainer_keeps_unit_decoder_columns_and_april_update_does_not():
    features = planted_features(16, 6, seed=0)
    stream = list(planted_stream(features, 2, 32, 20, seed=1))
    for cls, unit in ((StandardTrainer, True), (StandardTrainerAprilUpdate, False)):
        trainer = make_trainer(cls, lr=1e-2)
        for step, x in enumerate(stream):
            trainer.update(step, x)
        norms = trainer.ae.decoder.weight.norm(dim=0)
        assert torch.allclose(norms, torch.ones(12), atol=1e-5) == unit


def test_resample_neurons_reinitialises_dead_neurons_as_upstream():
    trainer = make_trainer(lr=1e-2)
    features = planted_features(16, 6, seed=0)
    for step, x in enumerate(planted_stream(features, 2, 32, 3, seed=1)):
        trainer.update(step, x)  # Adam moments are now non-zero
    ae, state = trainer.ae, trainer.optimizer.state
    x = rand(4, 6, seed=13, dtype=torch.float32)
    with torch.no_grad():
        y = ae(x)
        # only token 2 is reconstructed with an error: the first resampled neuron must take it
        y[2] += 1.0
    deads = torch.zeros(12, dtype=torch.bool)
    deads[[1, 5, 8, 9, 10, 11]] = True  # more dead neurons than tokens: the first 4 are resampled
    before = copy.deepcopy(ae.state_dict())
    moments = {name: {k: v.clone() for k, v in state[p].items()}
               for name, p in ae.named_parameters()}
    alive_norm = before["encoder.weight"][~deads].norm(dim=1).mean()
    assert resample_dead_neurons(ae, trainer.optimizer, deads, x, y,
                                 torch.Generator().manual_seed(0)) == 4
    resampled, untouched = torch.tensor([1, 5, 8, 9]), torch.tensor([0, 2, 3, 4, 6, 7, 10, 11])
    tokens = []
    for neuron in resampled.tolist():  # which token each resampled neuron copied
        matches = [t for t in range(4)
                   if torch.allclose(ae.encoder.weight[neuron], x[t] * alive_norm * 0.2)]
        assert len(matches) == 1
        tokens.append(matches[0])
        torch.testing.assert_close(ae.decoder.weight[:, neuron],
                                   y[matches[0]] / y[matches[0]].norm())
    # drawn without replacement, error-weighted
    assert tokens[0] == 2 and sorted(tokens) == [0, 1, 2, 3]
    assert not ae.encoder.bias[resampled].any()
    for name, index in (("encoder.weight", (untouched,)), ("encoder.bias", (untouched,)),
                        ("decoder.weight", (slice(None), untouched)), ("bias", (slice(None),))):
        assert torch.equal(ae.state_dict()[name][index], before[name][index]), name
        for key in ("exp_avg", "exp_avg_sq"):
            now, then = state[dict(ae.named_parameters())[name]][key], moments[name][key]
            assert torch.equal(now[index], then[index]), f"{name} {key}"
            if name != "bias":
                reset = (resampled,) if name.startswith("encoder") else (slice(None), resampled)
                assert not now[reset].any() and then[reset].any(), f"{name} {key} not reset"


def test_update_resamples_neurons_dead_for_half_the_period():
    trainer = make_trainer(lr=1e-3, resample_steps=10, warmup_steps=3)
    with torch.no_grad():
        trainer.ae.encoder.bias[[0, 7]] = -1e3  # these never fire
    features = planted_features(16, 6, seed=0)
    stream = list(planted_stream(features, 2, 32, 12, seed=2))
    for step, x in enumerate(stream[:10]):
        trainer.update(step, x)
    assert trainer.steps_since_active[[0, 7]].tolist() == [10, 10]
    assert (trainer.ae.encoder.bias[[0, 7]] < -100).all()  # step 0 resampled nothing
    trainer.update(10, stream[10])  # step 10: dead for 11 > 5 steps: resampled
    assert (trainer.ae.encoder.bias[[0, 7]] == 0).all()
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-3 / 3)  # the warmup restarted


def test_trainers_take_upstream_arguments_in_upstream_order():
    standard = ["steps", "activation_dim", "dict_size", "layer", "lm_name", "dict_class", "lr",
                "l1_penalty", "warmup_steps", "sparsity_warmup_steps", "decay_start",
                "resample_steps", "seed", "device", "wandb_name", "submodule_name"]
    april = [name for name in standard if name != "resample_steps"]
    for cls, names in ((StandardTrainer, standard), (StandardTrainerAprilUpdate, april)):
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert [p.name for p in parameters[:len(names)]] == names
        assert all(p.kind == p.KEYWORD_ONLY for p in parameters[len(names):])
        defaults = {p.name: p.default for p in parameters}
        assert (defaults["lr"], defaults["l1_penalty"], defaults["warmup_steps"],
                defaults["sparsity_warmup_steps"]) == (1e-3, 1e-1, 1000, 2000)
    # upstream's end-to-end test config, as a dict
    trainer = build_trainer({"trainer": StandardTrainer, "dict_class": AutoEncoder,
                             "activation_dim": 8, "dict_size": 32, "lr": 3e-4, "l1_penalty": 2.0,
                             "warmup_steps": 1000, "sparsity_warmup_steps": None,
                             "decay_start": None, "steps": 1220, "resample_steps": None, "seed": 42,
                             "wandb_name": "StandardTrainer-x", "layer": 3,
                             "lm_name": "m", "device": "cpu",
                             "submodule_name": "resid_post_layer_3"})
    config = trainer.config
    assert config["trainer_class"] == "StandardTrainer" and config["dict_class"] == "AutoEncoder"
    assert (config["l1_penalty"], config["lr"], config["layer"]) == (2.0, 3e-4, 3)


def test_standard_trainer_recovers_planted_features():
    features = planted_features(N_TRUE, D, seed=0)
    steps = 800
    config = dict(trainer=StandardTrainer, activation_dim=D, dict_size=2 * N_TRUE, lr=2e-3,
                  l1_penalty=1.0, warmup_steps=20, sparsity_warmup_steps=100, steps=steps, seed=0)
    [trainer] = trainSAE(planted_stream(features, K, 256, steps, seed=1), [config], steps,
                         progress=False)
    recovered = fraction_recovered(features, trainer.ae.decoder.weight.detach())
    print(f"StandardTrainer recovered {recovered:.1%} of planted features at cosine >= 0.9")
    assert recovered >= 0.9, f"only {recovered:.0%} of planted features recovered at cosine >= 0.9"
    assert trainer.last_metrics["fvu"] < 0.35


def test_resume_with_resampling_equals_uninterrupted(tmp_path, monkeypatch):
    from dictionary_learning.trainers import Trainer

    resampled, original = [], Trainer.resample_neurons
    monkeypatch.setattr(Trainer, "resample_neurons",
                        lambda *args: resampled.append(original(*args)) or resampled[-1])
    features = planted_features(16, 6, seed=0)
    common = dict(activation_dim=6, dict_size=24, lr=1e-2, l1_penalty=0.5, warmup_steps=2,
                  sparsity_warmup_steps=3, steps=20)
    configs = [dict(trainer=StandardTrainer, resample_steps=4, seed=0, **common),
               dict(trainer=StandardTrainer, entropy=True, seed=1, **common),
               dict(trainer=StandardTrainerAprilUpdate, seed=2, **common)]
    kwargs = dict(progress=False, normalize_activations=True, normalization_batches=1)
    straight = trainSAE(planted_stream(features, 2, 16, 30, seed=4), configs, 20,
                        save_dir=tmp_path / "a", **kwargs)
    assert sum(resampled) > 0, "the run never resampled a neuron"
    with pytest.raises(Crash):
        trainSAE(crashing(planted_stream(features, 2, 16, 30, seed=4), after=13), configs, 20,
                 save_dir=tmp_path / "b", checkpoint_steps=5, **kwargs)
    resumed = trainSAE(planted_stream(features, 2, 16, 30, seed=4), configs, 20,
                       save_dir=tmp_path / "b", resume=True, **kwargs)
    for a, b in zip(straight, resumed):
        for (name, x), y in zip(a.ae.state_dict().items(), b.ae.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(a.optimizer.state_dict()["state"][1]["exp_avg"],
                                   b.optimizer.state_dict()["state"][1]["exp_avg"], rtol=0, atol=0)

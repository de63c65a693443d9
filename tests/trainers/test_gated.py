"""Gated SAEs: GatedAutoEncoder's forward and both trainers' losses and gradients against float64
references written here, upstream's schedules and optimizer, p-annealing and resampling,
planted-dictionary recovery, saves and resume."""

import inspect

import pytest
import torch

from dictionary_learning.dictionary import AutoEncoderTopK, GatedAutoEncoder
from dictionary_learning.trainers import GatedAnnealTrainer, GatedSAETrainer, TopKTrainer
from dictionary_learning.training import build_trainer, trainSAE
from dictionary_learning.utils import load_dictionary, save_dictionary

from ..helpers import Crash, crashing, fraction_recovered, planted_features, planted_stream

D, N_TRUE, K = 16, 32, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These shapes are tiny: one thread is several times faster than two on a loaded 2-core
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
# cdist without the matmul shortcut (float32 errors of ~1e-3)
EXACT = "donot_use_mm_for_euclid_dist"


def randomise(ae, seed=0):
    """Non-zero biases and r_mag, decoder columns off unit norm: every path of the forward is
    exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in ae.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator,
                                              dtype=parameter.dtype))
    return ae


# --------------------------------------------------------------------------------------------------
# float64 references


def reference(params, x, transcoder=False):
    """(features, gate path relu(pre + b_gate), reconstruction) computed from the parameters
    alone."""
    pre = (x if transcoder else x - params["decoder_bias"]) @ params["encoder.weight"].T
    gate = (pre + params["gate_bias"]).clamp_min(0)
    magnitude = (params["r_mag"].exp() * pre + params["mag_bias"]).clamp_min(0)
    f = (pre + params["gate_bias"] > 0).double() * magnitude  # the step function passes no gradient
    x_hat = f @ params["decoder.weight"].T + params["decoder_bias"]
    if "skip.weight" in params:
        x_hat = x_hat + x @ params["skip.weight"].T
    return f, gate, x_hat


def reference_loss(params, x, y, sparsity, transcoder=False):
    """Reconstruction + sparsity(gate) + the auxiliary reconstruction of the gate path through a
    detached decoder, decoder bias and skip."""
    _f, gate, y_hat = reference(params, x, transcoder)
    y_hat_gate = gate @ params["decoder.weight"].detach().T + params["decoder_bias"].detach()
    if "skip.weight" in params:
        y_hat_gate = y_hat_gate + (x @ params["skip.weight"].T).detach()
    return ((y - y_hat).pow(2).sum(-1).mean() + sparsity(gate)
            + (y - y_hat_gate).pow(2).sum(-1).mean())


def leaf_copies(ae):
    return {name: p.detach().clone().double().requires_grad_() for name, p in ae.named_parameters()}


CASES = [{}, {"output_dim": 12, "skip": True}, {"output_dim": D, "transcoder": True}]


@pytest.mark.parametrize("options", CASES, ids=["sae", "skip-transcoder", "square-transcoder"])
def test_forward_matches_reference(options):
    ae = randomise(GatedAutoEncoder(D, 40, **options)).double()
    x = torch.randn(32, D, dtype=torch.float64)
    f, gate, x_hat = reference(leaf_copies(ae), x, ae.transcoder)
    assert 0 < (f > 0).float().mean() < 1
    torch.testing.assert_close(ae.encode(x), f)
    torch.testing.assert_close(ae.encode(x, return_gate=True)[1], gate)
    torch.testing.assert_close(ae.decode(f, x=x), x_hat)
    torch.testing.assert_close(ae(x), x_hat)
    _out, features = ae(x, output_features=True)
    torch.testing.assert_close(features, f)
    norms = ae.decoder.weight.norm(dim=0)
    torch.testing.assert_close(ae.encode(x, normalize_decoder=True), f * norms)
    torch.testing.assert_close(ae(x, output_features=True, normalize_decoder=True)[1], f * norms)
    if not options:  # upstream's positional decode(f, normalize_decoder)
        torch.testing.assert_close(ae.decode(f * norms, True), x_hat)
    else:
        torch.testing.assert_close(ae.decode(f, x), x_hat)


def test_default_initialisation_and_upstream_names():
    torch.manual_seed(0)
    ae = GatedAutoEncoder(D, 40)
    assert list(ae.state_dict()) == ["decoder_bias", "r_mag", "gate_bias", "mag_bias",
                                     "encoder.weight", "decoder.weight"]
    torch.testing.assert_close(ae.decoder.weight.norm(dim=0), torch.ones(40))
    assert torch.equal(ae.encoder.weight, ae.decoder.weight.T)
    assert all(not p.any() for p in (ae.decoder_bias, ae.r_mag, ae.gate_bias, ae.mag_bias))
    custom = GatedAutoEncoder(D, 40, initialization=lambda a: torch.nn.init.ones_(a.r_mag))
    assert torch.equal(custom.r_mag, torch.ones(40))
    with pytest.raises(ValueError, match="initialization"):
        GatedAutoEncoder(D, 40, initialization="xavier")


@pytest.mark.parametrize("options", CASES[:2], ids=["sae", "skip-transcoder"])
def test_gdm_loss_and_every_gradient_match_reference(options):
    trainer = GatedSAETrainer(100, D, 40, l1_penalty=0.7, sparsity_warmup_steps=10, seed=0,
                              **options)
    ae = randomise(trainer.ae).double()
    x = torch.randn(32, D, dtype=torch.float64)
    y = torch.randn(32, ae.output_dim, dtype=torch.float64) if ae.transcoder else x
    step = 4  # inside the sparsity warmup: the penalty is scaled by 4 / 10
    loss = trainer.loss(x, step, y=y)
    loss.backward()
    params = leaf_copies(ae)
    expected = reference_loss(params, x, y, lambda gate: 0.7 * 0.4 * gate.abs().sum(-1).mean(),
                              ae.transcoder)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for name, parameter in ae.named_parameters():
        assert params[name].grad.abs().max() > 0 or name == "skip.weight", name
        torch.testing.assert_close(parameter.grad, params[name].grad, msg=name)


@pytest.mark.parametrize("sparsity_function,p", [("Lp^p", 0.5), ("Lp", 0.5), ("Lp^p", 1.0)])
def test_anneal_loss_and_every_gradient_match_reference(sparsity_function, p):
    trainer = GatedAnnealTrainer(100, D, 40, sparsity_function=sparsity_function,
                                 sparsity_warmup_steps=10, output_dim=12, skip=True)
    ae = randomise(trainer.ae, seed=3).double()
    trainer.p, trainer.sparsity_coeff = p, 0.3
    x, y = torch.randn(32, D, dtype=torch.float64), torch.randn(32, 12, dtype=torch.float64)
    loss = trainer.loss(x, 20, y=y)  # after the sparsity warmup
    loss.backward()

    def penalty(gate):
        total = gate.pow(p).sum(-1)
        return 0.3 * (total if sparsity_function == "Lp^p" else total.pow(1 / p)).mean()

    params = leaf_copies(ae)
    expected = reference_loss(params, x, y, penalty, transcoder=True)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for name, parameter in ae.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
        torch.testing.assert_close(parameter.grad, params[name].grad, msg=name)


# --------------------------------------------------------------------------------------------------
# upstream's signatures, optimizer and schedules

UPSTREAM_GDM = ["steps", "activation_dim", "dict_size", "layer", "lm_name", "dict_class", "lr",
                "l1_penalty", "warmup_steps", "sparsity_warmup_steps", "decay_start", "seed",
                "device", "wandb_name", "submodule_name"]
UPSTREAM_ANNEAL = ["steps", "activation_dim", "dict_size", "layer", "lm_name", "dict_class", "lr",
                   "warmup_steps", "sparsity_warmup_steps", "decay_start", "sparsity_function",
                   "initial_sparsity_penalty", "anneal_start", "anneal_end", "p_start", "p_end",
                   "n_sparsity_updates",
                   "sparsity_queue_length",
                   "resample_steps", "device", "seed", "wandb_name"]


@pytest.mark.parametrize("cls,names",
                         [(GatedSAETrainer, UPSTREAM_GDM), (GatedAnnealTrainer, UPSTREAM_ANNEAL)])
def test_upstream_signature_and_config_keys(cls, names):
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in parameters[:len(names)]] == names
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters[len(names):])
    config = {name: value for name, value in zip(names, [50, D, 40, 3, "lm"])}
    trainer = build_trainer({"trainer": cls, "dict_class": GatedAutoEncoder, **config})
    saved = trainer.config
    assert saved["trainer_class"] == cls.__name__ and saved["dict_class"] == "GatedAutoEncoder"
    assert set(names) - {"dict_class"} <= set(saved)
    if cls is GatedAnnealTrainer:
        assert saved["sparsity_penalty"] == trainer.sparsity_coeff and trainer.seed == 42


def test_lr_schedule_and_unit_norm_decoder_are_upstreams():
    steps, warmup, decay = 30, 8, 20
    trainer = GatedSAETrainer(steps, D, 40, lr=1e-2, warmup_steps=warmup, decay_start=decay,
                              sparsity_warmup_steps=5)
    expected = [s / warmup if s < warmup else (steps - s) / (steps - decay) if s >= decay else 1.0
                for s in range(steps)]
    stream = planted_stream(planted_features(N_TRUE, D, 0), K, 64, steps, seed=1)
    for step, x in enumerate(stream):
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * expected[step])
        before = {name: p.detach().clone() for name, p in trainer.ae.named_parameters()}
        trainer.update(step, x)
        torch.testing.assert_close(trainer.ae.decoder.weight.norm(dim=0), torch.ones(40))
        if step == 0:  # lr 0 at step 0: nothing moves
            for name, parameter in trainer.ae.named_parameters():
                torch.testing.assert_close(parameter.detach(), before[name], msg=name)
    with pytest.raises(ValueError, match="decay_start"):
        GatedSAETrainer(30, D, 40, warmup_steps=10, decay_start=5)
    with pytest.raises(ValueError, match="sparsity_warmup_steps"):
        GatedSAETrainer(30, D, 40, warmup_steps=2, sparsity_warmup_steps=20, decay_start=10)
    with pytest.raises(ValueError, match="sparsity_function"):
        GatedAnnealTrainer(30, D, 40, sparsity_function="L0")


def test_constrained_adam_step_matches_projected_adam():
    trainer = GatedSAETrainer(10, D, 40, lr=1e-2, warmup_steps=0, sparsity_warmup_steps=None,
                              seed=1)
    weight = trainer.ae.decoder.weight
    reference_weight = weight.detach().clone().requires_grad_()
    reference_adam = torch.optim.Adam([reference_weight], lr=1e-2, betas=(0.0, 0.999))
    for step, x in enumerate(planted_stream(planted_features(N_TRUE, D, 0), K, 64, 3, seed=2)):
        trainer.optimizer.zero_grad()
        trainer.loss(x, step).backward()
        grad = weight.grad.clone()
        unit = weight.detach() / weight.detach().norm(dim=0)
        # the component along each column removed
        reference_weight.grad = grad - (grad * unit).sum(0) * unit
        trainer.before_optimizer_step()
        trainer.optimizer.step()
        trainer.after_optimizer_step()
        reference_adam.step()
        with torch.no_grad():
            reference_weight /= reference_weight.norm(dim=0)
        torch.testing.assert_close(weight.detach(), reference_weight.detach())
        assert not torch.equal(weight.detach(), unit)


# --------------------------------------------------------------------------------------------------
# p-annealing and resampling


def test_p_annealing_and_alpha_rescaling():
    steps, start, n, queue = 40, 10, 4, 3
    trainer = GatedAnnealTrainer(steps, D, 40, lr=1e-3, warmup_steps=2, sparsity_warmup_steps=None,
                                 anneal_start=start, p_end=0.2, n_sparsity_updates=n,
                                 sparsity_queue_length=queue, seed=0)
    # 10, 20, 30, 40
    update_steps = [round(start + i * (steps - start) / (n - 1)) for i in range(n)]
    p_values = [1 + i * (0.2 - 1) / (n - 1) for i in range(n)]
    lp_history = []  # (L at p, L at next p) per step, recomputed here from the gate the loss sees
    alpha, p, next_p = 0.1, 1.0, None
    for step, x in enumerate(planted_stream(planted_features(N_TRUE, D, 0), K, 64, steps, seed=1)):
        assert (trainer.p == pytest.approx(p)
                and trainer.sparsity_coeff == pytest.approx(alpha, rel=1e-5))
        with torch.no_grad():
            gate = trainer.ae.encode(x, return_gate=True)[1]
        if next_p is not None:
            lp_history.append((gate.pow(p).sum(-1).mean().item(),
                               gate.pow(next_p).sum(-1).mean().item()))
        trainer.update(step, x)
        if step in update_steps:
            if next_p is not None:
                recent = torch.tensor(lp_history[-queue:])
                alpha *= (recent[:, 0].mean() / recent[:, 1].mean()).item()
            i = update_steps.index(step)
            p, next_p = p_values[i], p_values[i + 1] if i + 1 < n else 0.2
    # the last update step is `steps`
    assert trainer.p == pytest.approx(p_values[2]) and trainer.p_step_count == 3
    assert alpha != 0.1


@pytest.mark.parametrize("transcoder", [False, True])
def test_dead_latents_are_resampled(transcoder):
    resample_steps, dead = 6, torch.arange(4)
    options = {"output_dim": 12} if transcoder else {}
    trainer = GatedAnnealTrainer(20, D, 40, lr=1e-3, warmup_steps=2, sparsity_warmup_steps=None,
                                 resample_steps=resample_steps, seed=0, **options)
    with torch.no_grad():
        trainer.ae.gate_bias[dead] = -1e3  # these latents never fire
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, D, generator=generator) for _ in range(resample_steps)]
    batches = [(x, x[:, :12] * 2) for x in batches] if transcoder else batches
    for step, batch in enumerate(batches[:-1]):
        trainer.update(step, batch)
    assert (trainer.steps_since_active[dead] == resample_steps - 1).all()
    trainer.update(resample_steps - 1, batches[-1])  # resamples after its optimizer step
    x, y = batches[-1] if transcoder else (batches[-1], batches[-1])
    ae = trainer.ae
    assert ((ae.gate_bias[dead] == 0).all() and (ae.mag_bias[dead] == 0).all()
            and (ae.r_mag[dead] == 0).all())
    columns = ae.decoder.weight[:, dead].T  # each is a target row's direction
    targets = y / y.norm(dim=-1, keepdim=True)
    assert torch.cdist(columns.detach(), targets, compute_mode=EXACT).min(dim=1).values.max() < 1e-5
    rows = ae.encoder.weight[dead].detach()  # input rows times 0.2 * the mean alive row norm
    factor = 0.2 * ae.encoder.weight[4:].detach().norm(dim=-1).mean()
    assert torch.cdist(rows, factor * x, compute_mode=EXACT).min(dim=1).values.max() < 1e-5
    for parameter, index in ((ae.encoder.weight, dead), (ae.gate_bias, dead)):
        for moment in ("exp_avg", "exp_avg_sq"):
            assert (trainer.optimizer.state[parameter][moment][index] == 0).all()
    assert (trainer.optimizer.state[ae.decoder.weight]["exp_avg"][:, dead] == 0).all()
    # the lr warmup restarts after each resampling
    assert trainer.optimizer.param_groups[0]["lr"] == 0


# --------------------------------------------------------------------------------------------------
# planted ground truth


@pytest.mark.parametrize("cls", [GatedSAETrainer, GatedAnnealTrainer])
def test_recovers_planted_features(cls):
    features = planted_features(N_TRUE, D, seed=0)
    steps = 400
    penalty = {"l1_penalty": 2.0} if cls is GatedSAETrainer else {
        "initial_sparsity_penalty": 2.0, "anneal_start": steps // 2, "n_sparsity_updates": 5,
        "p_end": 0.5}
    config = dict(trainer=cls, activation_dim=D, dict_size=2 * N_TRUE, lr=2e-2, warmup_steps=20,
                  sparsity_warmup_steps=40, seed=0, steps=steps, **penalty)
    [trainer] = trainSAE(planted_stream(features, K, 256, steps, seed=1), [config], steps,
                         progress=False)
    recovered = fraction_recovered(features, trainer.ae.decoder.weight.detach())
    print(f"{cls.__name__}: {recovered:.0%} of planted features recovered at cosine >= 0.9")
    assert recovered >= 0.9, f"only {recovered:.0%} of planted features recovered at cosine >= 0.9"
    assert trainer.last_metrics["fvu"] < 0.2 and K / 2 <= trainer.last_metrics["l0"] <= 2 * K


# --------------------------------------------------------------------------------------------------
# saves, scale folding, resume


@pytest.mark.parametrize("options", CASES, ids=["sae", "skip-transcoder", "square-transcoder"])
def test_save_load_round_trip(tmp_path, options):
    ae = randomise(GatedAutoEncoder(D, 40, **options))
    save_dictionary(ae, tmp_path)
    loaded, config = load_dictionary(tmp_path)
    assert isinstance(loaded, GatedAutoEncoder) and loaded.transcoder == ae.transcoder
    assert config["trainer"]["dict_class"] == "GatedAutoEncoder"
    x = torch.randn(16, D)
    assert torch.equal(loaded(x), ae(x)) and torch.equal(loaded.encode(x), ae.encode(x))
    again = GatedAutoEncoder.from_pretrained(tmp_path / "ae.pt", "cpu")
    assert torch.equal(again(x), ae(x))


@pytest.mark.parametrize("options,scales",
                         [({}, (3.0, 3.0)), ({"output_dim": 12, "skip": True}, (3.0, 0.5))])
def test_fold_scale(options, scales):
    old = randomise(GatedAutoEncoder(D, 40, **options)).double()
    new = randomise(GatedAutoEncoder(D, 40, **options)).double()
    new.load_state_dict(old.state_dict())
    new.fold_scale(*scales)
    x = torch.randn(32, D, dtype=torch.float64)
    s_in, s_out = scales
    torch.testing.assert_close(new(x), old(s_in * x) / s_out)
    torch.testing.assert_close(new.encode(x), old.encode(s_in * x) / s_in)
    torch.testing.assert_close(new.encode(x, return_gate=True)[1],
                               old.encode(s_in * x, return_gate=True)[1] / s_in)
    if not options:  # upstream's scale_biases(s) is folding (1 / s, 1 / s)
        upstream = randomise(GatedAutoEncoder(D, 40)).double()
        upstream.load_state_dict(old.state_dict())
        upstream.scale_biases(1 / 3.0)
        for a, b in zip(upstream.state_dict().values(), new.state_dict().values()):
            torch.testing.assert_close(a, b)
        with pytest.raises(ValueError, match="scale_in must equal scale_out"):
            new.fold_scale(2.0, 1.0)


def test_normalised_training_saves_raw_scale_dictionary(tmp_path):
    features = planted_features(N_TRUE, D, seed=0)
    stream = (x * 7.0 for x in planted_stream(features, K, 64, 40, seed=6))
    config = {"trainer": GatedSAETrainer, "activation_dim": D, "dict_size": 40, "lr": 1e-2,
              "warmup_steps": 5, "sparsity_warmup_steps": 10, "steps": 30, "seed": 0}
    [trainer] = trainSAE(stream, [config], 30, save_dir=tmp_path, normalize_activations=True,
                         normalization_batches=4, progress=False)
    loaded, saved = load_dictionary(tmp_path / "trainer_0")
    scale = saved["trainer"]["normalization_scales"][0]
    raw = next(planted_stream(features, K, 32, 1, seed=7)) * 7.0
    torch.testing.assert_close(loaded(raw), trainer.ae(raw * scale) / scale, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loaded.encode(raw), trainer.ae.encode(raw * scale) / scale,
                               atol=1e-4, rtol=1e-4)


def test_resume_with_other_trainers_equals_uninterrupted(tmp_path, monkeypatch):
    resampled = []
    original = GatedAnnealTrainer.resample_neurons

    def counting(self, deads, *args):
        resampled.append(int(deads.sum()))
        return original(self, deads, *args)

    monkeypatch.setattr(GatedAnnealTrainer, "resample_neurons", counting)
    # one of 3 directions per token: latents facing away never fire
    features = planted_features(3, D, seed=0)
    steps = 24
    common = {"activation_dim": D, "dict_size": 40, "lr": 1e-2, "steps": steps}
    configs = [
        {"trainer": GatedSAETrainer, "warmup_steps": 4, "sparsity_warmup_steps": 8, "seed": 0,
         **common},
        {"trainer": GatedAnnealTrainer, "warmup_steps": 2, "sparsity_warmup_steps": None,
         "initial_sparsity_penalty": 3.0, "anneal_start": 6, "n_sparsity_updates": 6,
         "sparsity_queue_length": 3,
         "resample_steps": 8, "seed": 1, **common},
        {"trainer": TopKTrainer, "dict_class": AutoEncoderTopK, "k": K, "warmup_steps": 4,
         "seed": 2, **common},
    ]
    kwargs = {"normalize_activations": True, "normalization_batches": 2, "progress": False}
    straight = trainSAE(planted_stream(features, 1, 64, 40, seed=4), configs, steps,
                        save_dir=tmp_path / "a", **kwargs)
    assert straight[1].p_step_count >= 3 and straight[1].p < 1
    assert len(resampled) == 3 and resampled[1] > 0 and resampled[2] > 0  # at steps 7, 15, 23
    with pytest.raises(Crash):
        trainSAE(crashing(planted_stream(features, 1, 64, 40, seed=4), after=19), configs, steps,
                 save_dir=tmp_path / "b", checkpoint_steps=5, **kwargs)
    resumed = trainSAE(planted_stream(features, 1, 64, 40, seed=4), configs, steps,
                       save_dir=tmp_path / "b", resume=True, **kwargs)
    for a, b in zip(straight, resumed):
        for (name, x), y in zip(a.ae.state_dict().items(), b.ae.state_dict().values()):
            assert torch.equal(x, y), name
    assert straight[1].sparsity_coeff == resumed[1].sparsity_coeff
    for i in range(3):
        saved_a, _ = load_dictionary(tmp_path / "a" / f"trainer_{i}")
        saved_b, _ = load_dictionary(tmp_path / "b" / f"trainer_{i}")
        assert all(torch.equal(x, y)
                   for x, y in zip(saved_a.state_dict().values(), saved_b.state_dict().values()))

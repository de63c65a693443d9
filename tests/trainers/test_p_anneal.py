"""PAnnealTrainer: the L_p penalty and its gradients against a float64 reference, the annealing of p
and the rescaling of the coefficient, the p -> 0 guard, resampling, planted recovery and resume."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning.trainers import PAnnealTrainer
from dictionary_learning.training import trainSAE

from ..helpers import Crash, crashing, fraction_recovered, planted_features, planted_stream
from .test_standard import one_thread, rand, randomised  # noqa: F401 (one_thread: autouse fixture)

D, N_TRUE, K = 32, 128, 3


def make_trainer(**kwargs):
    config = dict(steps=40, activation_dim=6, dict_size=12, warmup_steps=2, sparsity_warmup_steps=4,
                  initial_sparsity_penalty=0.3, anneal_start=10, n_sparsity_updates=4, seed=0)
    config.update(kwargs)
    return PAnnealTrainer(**config)


def codes_reference(ae, x):
    return F.relu((x - ae.bias) @ ae.encoder.weight.t() + ae.encoder.bias)


def lp_reference(f, p, function):
    """Per token sum_i f_i^p over the active codes (or its 1/p power), averaged over tokens, in
    float64."""
    values = []
    for row in f:
        active = row[row > 0]
        total = (active ** p).sum() + row.sum() * 0  # keeps the graph for rows with no active code
        values.append(total if function == "Lp^p" else total ** (1 / p))
    return torch.stack(values).mean()


@pytest.mark.parametrize("function", ["Lp", "Lp^p"])
@pytest.mark.parametrize("p", [1.0, 0.5])
def test_lp_loss_and_gradients_match_float64_reference(function, p):
    trainer = make_trainer(sparsity_function=function)
    trainer.p = p
    ae = randomised(trainer.ae.double())
    x = rand(8, 6, seed=11)
    params = {name: q.detach().clone().requires_grad_() for name, q in ae.named_parameters()}
    f = F.relu((x - params["bias"]) @ params["encoder.weight"].t() + params["encoder.bias"])
    x_hat = f @ params["decoder.weight"].t() + params["bias"]
    # step 2 of 4 warmup
    want = ((x - x_hat) ** 2).sum(dim=1).mean() + 0.3 * 0.5 * lp_reference(f, p, function)
    got = trainer.loss(x, 2)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for name, q in ae.named_parameters():
        assert torch.isfinite(q.grad).all(), name
        torch.testing.assert_close(q.grad, params[name].grad, msg=f"gradient of {name}")
    log = trainer.loss(x, 2, logging=True)  # upstream's call form
    assert log.losses["p"] == p
    assert log.losses["scaled_lp_loss"] == pytest.approx(0.15 * lp_reference(f, p, function).item())


def test_p_is_annealed_and_the_coefficient_rescaled_to_keep_the_penalty():
    """With lr 0 the codes of each batch are fixed, so the rescaled coefficient can be computed
    independently: at the change from p to p', alpha' = alpha * mean L_p / mean L_p' over the last
    `sparsity_queue_length` steps."""
    trainer = make_trainer(lr=0.0, sparsity_queue_length=5, sparsity_warmup_steps=None)
    ae = randomised(trainer.ae)
    with torch.no_grad():
        # unit columns: ConstrainedAdam leaves them as they are
        ae.decoder.weight /= ae.decoder.weight.norm(dim=0)
    batches = [rand(16, 6, seed=100 + i, dtype=torch.float32) for i in range(40)]
    ps, coefficients = [], []
    for step, x in enumerate(batches):
        trainer.update(step, x)
        ps.append(trainer.p)
        coefficients.append(trainer.sparsity_coeff)
    # updates at linspace(10, 40, 4) = 10, 20, 30, (40: never reached) with p = 1, 2/3, 1/3, (0)
    assert ps[9] == 1 and ps[10] == 1 and ps[19] == 1
    assert (ps[20] == pytest.approx(2 / 3) and ps[29] == pytest.approx(2 / 3)
            and ps[30] == pytest.approx(1 / 3))
    assert ps[39] == pytest.approx(1 / 3) and trainer.next_p == 0
    # no rescaling at the first update (no queue yet)
    assert coefficients[19] == coefficients[0] == 0.3
    with torch.no_grad():
        codes = [codes_reference(ae.double(), x.double()) for x in batches]
    expected = 0.3
    for step, (p, next_p) in ((20, (1.0, 2 / 3)), (30, (2 / 3, 1 / 3))):
        window = codes[step - 4:step + 1]
        expected *= (sum(lp_reference(f, p, "Lp") for f in window) /
                     sum(lp_reference(f, next_p, "Lp") for f in window)).item()
        assert coefficients[step] == pytest.approx(expected, rel=1e-4)
    assert all(c > 0 and math.isfinite(c) for c in coefficients)


def test_p_zero_guard():
    # upstream's defaults put p_end = 0 at step `steps` (never reached): training works with next_p
    # = 0
    trainer = make_trainer(anneal_start=2, n_sparsity_updates=3, steps=12)
    for step, x in enumerate(rand(12, 8, 6, seed=1, dtype=torch.float32)):
        loss = trainer.update(step, x)
        assert math.isfinite(loss)
    assert trainer.next_p == 0 and trainer.p == 0.5
    with pytest.raises(ValueError, match="p reaches p_end=0 at step 7 < steps=12"):
        make_trainer(anneal_start=2, anneal_end=7, n_sparsity_updates=3, steps=12)
    # 'Lp^p' at p = 0 is the number of active codes (its limit), without gradient
    trainer = make_trainer(sparsity_function="Lp^p", anneal_start=2, anneal_end=7,
                           n_sparsity_updates=3, steps=12)
    for step, x in enumerate(rand(12, 8, 6, seed=1, dtype=torch.float32)):
        assert math.isfinite(trainer.update(step, x))
    assert trainer.p == 0
    f = torch.tensor([[0.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    assert trainer.lp_norm(f, 0).item() == 1.0
    with pytest.raises(ValueError, match="sparsity_function must be one of"):
        make_trainer(sparsity_function="L1")


def test_resampling_happens_at_the_end_of_each_period():
    trainer = make_trainer(resample_steps=6, lr=1e-3)
    with torch.no_grad():
        trainer.ae.encoder.bias[[2, 4]] = -1e3  # never fire
    for step, x in enumerate(rand(11, 16, 6, seed=3, dtype=torch.float32)):
        trainer.update(step, x)
        if step == 4:
            assert (trainer.ae.encoder.bias[[2, 4]] < -100).all()
        if step == 5:  # 5 % 6 == 6 - 1 and dead for 6 > 3 steps
            assert (trainer.ae.encoder.bias[[2, 4]] == 0).all()


def test_upstream_arguments_order_defaults_and_config():
    names = ["steps", "activation_dim", "dict_size", "layer", "lm_name", "dict_class", "lr",
             "warmup_steps", "decay_start", "sparsity_warmup_steps", "sparsity_function",
             "initial_sparsity_penalty", "anneal_start", "anneal_end", "p_start", "p_end",
             "n_sparsity_updates", "sparsity_queue_length", "resample_steps", "device", "seed",
             "wandb_name", "submodule_name"]
    parameters = list(inspect.signature(PAnnealTrainer.__init__).parameters.values())[1:]
    assert [p.name for p in parameters[:len(names)]] == names
    assert all(p.kind == p.KEYWORD_ONLY for p in parameters[len(names):])
    defaults = {p.name: p.default for p in parameters}
    assert [defaults[n] for n in ("lr", "sparsity_function", "initial_sparsity_penalty",
                                  "anneal_start", "p_start",
                                  "p_end", "n_sparsity_updates", "sparsity_queue_length",
                                  "seed")] == \
        [1e-3, "Lp", 1e-1, 15000, 1, 0, 10, 10, 42]
    config = make_trainer(n_sparsity_updates="continuous", layer=2, lm_name="m").config
    upstream_keys = {"trainer_class", "dict_class", "activation_dim", "dict_size", "lr",
                     "sparsity_function", "sparsity_penalty", "p_start", "p_end", "anneal_start",
                     "sparsity_queue_length", "n_sparsity_updates", "warmup_steps",
                     "sparsity_warmup_steps", "decay_start", "resample_steps", "steps", "seed",
                     "layer", "lm_name", "wandb_name", "submodule_name"}
    assert upstream_keys <= set(config)
    assert config["n_sparsity_updates"] == 31 and config["dict_class"] == "AutoEncoder"


def test_p_anneal_recovers_planted_features():
    features = planted_features(N_TRUE, D, seed=0)
    steps = 800
    config = dict(trainer=PAnnealTrainer, activation_dim=D, dict_size=2 * N_TRUE, lr=2e-3,
                  initial_sparsity_penalty=1.0, warmup_steps=20, sparsity_warmup_steps=100,
                  anneal_start=400, n_sparsity_updates=5, steps=steps, seed=0)
    [trainer] = trainSAE(planted_stream(features, K, 256, steps, seed=1), [config], steps,
                         progress=False)
    assert trainer.p == 0.25  # annealed 1 -> 0.75 -> 0.5 -> 0.25 (-> 0 at `steps`, never reached)
    recovered = fraction_recovered(features, trainer.ae.decoder.weight.detach())
    print(f"PAnnealTrainer recovered {recovered:.1%} of planted features at cosine >= 0.9")
    assert recovered >= 0.9, f"only {recovered:.0%} of planted features recovered at cosine >= 0.9"


def test_resume_equals_uninterrupted(tmp_path):
    features = planted_features(16, 6, seed=0)
    configs = [dict(trainer=PAnnealTrainer, activation_dim=6, dict_size=24, lr=1e-2, warmup_steps=2,
                    sparsity_warmup_steps=3, anneal_start=4, n_sparsity_updates=6,
                    sparsity_queue_length=3,
                    resample_steps=5, steps=20, seed=0, sparsity_function=function)
               for function in ("Lp", "Lp^p")]
    kwargs = dict(progress=False)
    straight = trainSAE(planted_stream(features, 2, 16, 30, seed=4), configs, 20,
                        save_dir=tmp_path / "a", **kwargs)
    with pytest.raises(Crash):
        trainSAE(crashing(planted_stream(features, 2, 16, 30, seed=4), after=12), configs, 20,
                 save_dir=tmp_path / "b", checkpoint_steps=5, **kwargs)
    resumed = trainSAE(planted_stream(features, 2, 16, 30, seed=4), configs, 20,
                       save_dir=tmp_path / "b", resume=True, **kwargs)
    for a, b in zip(straight, resumed):
        for (name, x), y in zip(a.ae.state_dict().items(), b.ae.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
        assert (a.p, a.next_p, a.sparsity_coeff) == (b.p, b.next_p, b.sparsity_coeff)
        assert a.p < 1

"""JumpReLU: the dictionary and its trainer against plain float64 autograd references written here
(forward, every gradient, the straight-through threshold estimates, one full optimizer step), a
planted dictionary, save / load round trips (SAE, transcoder, normalisation folding, SAELens
folders) and trainSAE with resume."""

import inspect
import json

import pytest
import torch

from dictionary_learning.dictionary import AutoEncoderTopK, JumpReluAutoEncoder
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.trainers.jumprelu import (
    JumpReLUFunction,
    JumpReluTrainer,
    RectangleFunction,
    StepFunction,
)
from dictionary_learning.training import build_trainer, trainSAE
from dictionary_learning.utils import load_dictionary, save_dictionary

from ..helpers import Crash, crashing, fraction_recovered, planted_features, planted_stream

D, N_TRUE, K = 32, 128, 3
BANDWIDTH = 0.5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread is faster, and far faster on a loaded 2-core machine (2 threads: 90
    s, 1: 7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# float64 references


def kernel(z):
    return (z.abs() < 0.5).double()


def reference_encode(params, x, subtract_b_dec=False):
    enc_in = x - params["b_dec"] if subtract_b_dec else x
    pre = enc_in @ params["W_enc"] + params["b_enc"]
    return torch.relu(pre * (pre > params["threshold"]).double()), pre


def reference_loss(params, x, y, bandwidth, target_l0, penalty, ramp):
    """Upstream's loss with its straight-through estimates written as surrogates: each step
    function's value with a term whose value is 0 and whose threshold derivative is the estimate."""
    thr = params["threshold"]
    pre = x @ params["W_enc"] + params["b_enc"]
    jump = -(thr.detach() / bandwidth) * kernel((pre.detach() - thr.detach()) / bandwidth) * thr
    f = pre * (pre.detach() > thr.detach()).double() + (jump - jump.detach())
    y_hat = f @ params["W_dec"] + params["b_dec"]
    if "skip.weight" in params:
        y_hat = y_hat + x @ params["skip.weight"].t()
    recon = (y - y_hat).pow(2).sum(-1).mean()
    step = -(1 / bandwidth) * kernel((f.detach() - thr.detach()) / bandwidth) * thr
    l0 = ((f.detach() > thr.detach()).double() + step - step.detach()).sum(-1).mean()
    return recon + penalty * (l0 / target_l0 - 1).pow(2) * ramp


def randomised(ae, seed=0):
    """Non-trivial parameters: biases, thresholds spread over (-0.2, 0.8) so that some sit inside
    the kernel's window around 0 and many pre-activations fall inside their window."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype)
                    * (0.3 if "b_" in name else 1.0))
        ae.threshold.copy_(torch.rand(ae.threshold.shape, generator=generator,
                                      dtype=ae.threshold.dtype) - 0.2)
    return ae


def jumprelu_trainer(**overrides):
    config = dict(steps=100, activation_dim=8, dict_size=48, seed=0, warmup_steps=0,
                  sparsity_warmup_steps=10, bandwidth=BANDWIDTH, target_l0=6.0,
                  sparsity_penalty=2.0)
    config.update(overrides)
    trainer = JumpReluTrainer(**config)
    randomised(trainer.ae.double(), seed=1)
    return trainer


# --------------------------------------------------------------------------------------------------
# forward and gradients


@pytest.mark.parametrize("kind", ["sae", "sae_b_dec_input", "transcoder"])
def test_forward_matches_reference(kind):
    extra = dict(output_dim=5, transcoder=True, skip=True) if kind == "transcoder" else {}
    ae = randomised(JumpReluAutoEncoder(8, 24, **extra).double())
    ae.apply_b_dec_to_input = kind == "sae_b_dec_input"
    x = torch.randn(10, 8, dtype=torch.float64)
    params = dict(ae.named_parameters())
    f_ref, pre_ref = reference_encode(params, x, subtract_b_dec=kind == "sae_b_dec_input")
    y_ref = f_ref @ params["W_dec"] + params["b_dec"] + (x @ params["skip.weight"].t() if extra
                                                         else 0)
    f, pre = ae.encode(x, output_pre_jump=True)
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(pre, pre_ref)
    assert 0 < (f > 0).double().mean() < 1
    x_hat, features = ae(x, output_features=True)
    torch.testing.assert_close(x_hat, y_ref)
    torch.testing.assert_close(features, f_ref)
    torch.testing.assert_close(ae(x), y_ref)
    torch.testing.assert_close(ae.decode(f_ref, x), y_ref)


def test_straight_through_functions_match_reference():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    thr = (torch.rand(12, generator=generator, dtype=torch.float64) - 0.2).requires_grad_()
    upstream_grad = torch.randn(64, 12, generator=generator, dtype=torch.float64)
    window = kernel((x.detach() - thr.detach()) / BANDWIDTH)
    assert window.sum() > 20  # the estimates are exercised
    for function, value, d_x, d_thr in (
        (JumpReLUFunction, x * (x > thr), (x > thr).double(), -(thr / BANDWIDTH) * window),
        (StepFunction, (x > thr).double(), torch.zeros_like(x), -(1 / BANDWIDTH) * window),
    ):
        out = function.apply(x, thr, BANDWIDTH)
        torch.testing.assert_close(out, value.detach())
        grad_x, grad_thr = torch.autograd.grad(out, (x, thr), upstream_grad)
        torch.testing.assert_close(grad_x, (d_x * upstream_grad).detach())
        torch.testing.assert_close(grad_thr, (d_thr * upstream_grad).sum(0).detach())
    z = torch.tensor([-0.6, -0.5, -0.4, 0.0, 0.49, 0.5, 0.7], dtype=torch.float64,
                     requires_grad=True)
    out = RectangleFunction.apply(z)
    torch.testing.assert_close(out, torch.tensor([0, 0, 1, 1, 1, 0, 0], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out, z, torch.arange(7.0, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([0, 0, 2, 3, 4, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("sparse", [True, False])
# 0: the jump's estimate alone; 2: with the L0 term's
@pytest.mark.parametrize("penalty", [0.0, 2.0])
@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_loss_and_every_gradient_match_reference(sparse, penalty, kind):
    extra = dict(output_dim=5, transcoder=True, skip=True) if kind == "transcoder" else {}
    trainer = jumprelu_trainer(sparse=sparse, sparsity_penalty=penalty, **extra)
    x = torch.randn(40, 8, dtype=torch.float64)
    y = torch.randn(40, 5, dtype=torch.float64) if extra else x
    step = 4  # inside the sparsity warmup: the penalty is ramped to 4/10
    out = trainer.step_loss(x, y, step)
    loss = out.loss
    loss.backward()
    params = {name: p.detach().clone().requires_grad_()
              for name, p in trainer.ae.named_parameters()}
    expected = reference_loss(params, x, y, BANDWIDTH, 6.0, penalty, step / 10)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for name, p in trainer.ae.named_parameters():
        assert params[name].grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, params[name].grad, msg=name)
    assert out.metrics["sparse_step"] == float(sparse)


def test_update_matches_reference_step():
    """One update: gradient, decoder-parallel component removed, clipped to norm 1, Adam with betas
    (0, 0.999) at the warmed-up lr, decoder rows renormalised; the sparse and the dense step agree
    over several steps."""
    trainers = [jumprelu_trainer(sparse=s, lr=1e-2, warmup_steps=3) for s in (True, False)]
    params = {name: p.detach().clone().requires_grad_()
              for name, p in trainers[0].ae.named_parameters()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-2, betas=(0.0, 0.999), eps=1e-8)
    generator = torch.Generator().manual_seed(3)
    for step in range(4):
        x = torch.randn(40, 8, generator=generator, dtype=torch.float64)
        for trainer in trainers:
            trainer.update(step, x)
        optimizer.zero_grad()
        reference_loss(params, x, x, BANDWIDTH, 6.0, 2.0, min(step / 10, 1.0)).backward()
        with torch.no_grad():
            rows = params["W_dec"] / params["W_dec"].norm(dim=1, keepdim=True)
            params["W_dec"].grad -= (params["W_dec"].grad * rows).sum(1, keepdim=True) * rows
            total = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values()))
            for p in params.values():
                p.grad *= min(1.0, 1 / (total.item() + 1e-6))
            for group in optimizer.param_groups:
                group["lr"] = 1e-2 * min(step / 3, 1.0)
            optimizer.step()
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
        # the projection's 1e-6 (upstream's) shows at 1e-7
        for name, p in trainers[0].ae.named_parameters():
            torch.testing.assert_close(p, params[name], atol=1e-6, rtol=1e-6,
                                       msg=f"step {step}: {name}")
            torch.testing.assert_close(p, dict(trainers[1].ae.named_parameters())[name],
                                       msg=f"step {step}: {name}")
    torch.testing.assert_close(trainers[0].ae.W_dec.norm(dim=1),
                               torch.ones(48, dtype=torch.float64))


def test_upstream_logging_loss_and_config():
    trainer = jumprelu_trainer()
    x = torch.randn(16, 8, dtype=torch.float64)
    before = trainer.num_tokens_since_fired.clone()
    _, pre = reference_encode(dict(trainer.ae.named_parameters()), x)
    for sparse in (True, False):
        trainer.sparse = sparse
        log = trainer.loss(x, step=3, logging=True)
        # logging changes no training state
        assert torch.equal(trainer.num_tokens_since_fired, before)
        # training codes: no relu
        torch.testing.assert_close(log.f, (pre * (pre > trainer.ae.threshold)).detach())
        torch.testing.assert_close(log.recon, trainer.ae.decode(log.f))
    assert set(log.losses) >= {"l2_loss", "loss"}
    # upstream's form; keyword y
    for call in (lambda: trainer.loss(x, 3), lambda: trainer.loss(x, step=3, y=x)):
        torch.testing.assert_close(call(), trainer.step_loss(x, x, 3).loss)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.0, 0.999)
    config = trainer.config
    upstream_keys = {"trainer_class", "dict_class", "lr", "steps", "seed", "activation_dim",
                     "dict_size", "device", "layer", "lm_name", "wandb_name", "submodule_name",
                     "bandwidth", "sparsity_penalty", "sparsity_warmup_steps", "target_l0"}
    assert upstream_keys <= set(config) and config["dict_class"] == "JumpReluAutoEncoder"
    json.dumps(config)
    # upstream's parameters, in upstream's order, with upstream's defaults
    upstream = [("steps", None), ("activation_dim", None), ("dict_size", None), ("layer", None),
                ("lm_name", None), ("dict_class", JumpReluAutoEncoder), ("seed", None),
                ("lr", 7e-5), ("bandwidth", 0.001), ("sparsity_penalty", 1.0),
                ("warmup_steps", 1000), ("sparsity_warmup_steps", 2000), ("decay_start", None),
                ("target_l0", 20.0),
                ("device", "cpu"), ("wandb_name", "JumpRelu"), ("submodule_name", None)]
    params = (list(inspect.signature(JumpReluTrainer.__init__).parameters.values())
              [1:len(upstream) + 1])
    assert [p.name for p in params] == [name for name, _ in upstream]
    for p, (name, default) in zip(params[5:], upstream[5:]):
        assert p.default == default, name
    # every upstream key through build_trainer (upstream-style config dicts)
    built = build_trainer(dict(trainer=JumpReluTrainer, dict_class=JumpReluAutoEncoder, steps=50,
                               activation_dim=8, dict_size=16, layer=3, lm_name="m", seed=1,
                               lr=1e-3, bandwidth=0.01, sparsity_penalty=0.5, warmup_steps=5,
                               sparsity_warmup_steps=10, decay_start=40, target_l0=4.0,
                               device="cpu", wandb_name="J",
                               submodule_name="resid"))
    assert (built.config["target_l0"] == 4.0 and built.sparsity_coefficient == 0.5
            and built.layer == 3)


# --------------------------------------------------------------------------------------------------
# planted ground truth


def test_planted_features_recovered():
    features = planted_features(N_TRUE, D, seed=0)
    steps = 800
    config = dict(trainer=JumpReluTrainer, activation_dim=D, dict_size=2 * N_TRUE, lr=5e-3,
                  steps=steps, warmup_steps=20, sparsity_warmup_steps=160, decay_start=560,
                  bandwidth=0.1, target_l0=K, seed=0)
    [trainer] = trainSAE(planted_stream(features, K, 256, steps, seed=1), [config], steps,
                         progress=False)
    recovered = fraction_recovered(features, trainer.ae.W_dec.detach().t())
    print(f"JumpReLU planted recovery: {recovered:.1%} of {N_TRUE} directions at cosine >= 0.9, "
          f"L0 {trainer.last_metrics['l0']:.2f}, FVU {trainer.last_metrics['fvu']:.3f}")
    assert recovered >= 0.9, f"only {recovered:.0%} of planted features recovered at cosine >= 0.9"
    assert K / 2 <= trainer.last_metrics["l0"] <= 2 * K and trainer.last_metrics["fvu"] < 0.25
    # trained codes are sparse enough for the sparse step
    assert trainer.last_metrics["sparse_step"] == 1.0


# --------------------------------------------------------------------------------------------------
# saving and loading


@pytest.mark.parametrize("kind", ["sae", "square_transcoder", "skip_transcoder"])
def test_save_load_round_trip(tmp_path, kind):
    extra = {"sae": {}, "square_transcoder": dict(transcoder=True),
             "skip_transcoder": dict(output_dim=6, transcoder=True, skip=True)}[kind]
    ae = randomised(JumpReluAutoEncoder(8, 24, **extra))
    save_dictionary(ae, tmp_path, {"trainer": {"lm_name": "m"}})
    loaded, config = load_dictionary(tmp_path)
    assert type(loaded) is JumpReluAutoEncoder and loaded.transcoder == ae.transcoder
    assert (config["trainer"]["dict_class"] == "JumpReluAutoEncoder"
            and config["trainer"]["lm_name"] == "m")
    x = torch.randn(12, 8)
    for a, b in zip(loaded(x, output_features=True), ae(x, output_features=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = torch.load(tmp_path / "ae.pt", weights_only=True)
    expected_keys = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    if kind == "sae":
        assert set(state) == expected_keys  # upstream's keys exactly
        again = JumpReluAutoEncoder.from_pretrained(tmp_path / "ae.pt")
        torch.testing.assert_close(again(x), ae(x), rtol=0, atol=0)
    else:  # upstream's loader must refuse a transcoder (its strict load_state_dict sees the marker)
        assert expected_keys < set(state) and "is_transcoder" in state


def test_fold_scale_and_scale_biases():
    for subtract_b_dec in (False, True):
        ae = randomised(JumpReluAutoEncoder(8, 24).double())
        ae.apply_b_dec_to_input = subtract_b_dec
        x = torch.randn(20, 8, dtype=torch.float64)
        old_out, old_f = ae(2.5 * x, output_features=True)
        ae.fold_scale(2.5, 2.5)
        new_out, new_f = ae(x, output_features=True)
        torch.testing.assert_close(new_out, old_out / 2.5)
        torch.testing.assert_close(new_f, old_f / 2.5)
        old_out = ae(3.0 * x)
        # unequal scales too (the b_dec subtracted from the input moves with the output's)
        ae.fold_scale(3.0, 0.5)
        torch.testing.assert_close(ae(x), old_out / 0.5)
        before = ae(x)
        ae.scale_biases(3.0)  # upstream's: new(3 x) == 3 old(x)
        torch.testing.assert_close(ae(3.0 * x), 3.0 * before)
    tc = randomised(JumpReluAutoEncoder(8, 24, output_dim=5, transcoder=True, skip=True).double())
    old = tc(4.0 * x)
    tc.fold_scale(4.0, 0.5)
    torch.testing.assert_close(tc(x), old / 0.5)


@pytest.mark.parametrize("transcoder", [False, True])
def test_normalised_training_saves_raw_scale_dictionary(tmp_path, transcoder):
    features = planted_features(N_TRUE, D, seed=0)
    out = planted_features(N_TRUE, 12, seed=5) if transcoder else None
    stream = planted_stream(features, K, 64, 40, seed=6, features_out=out)
    stream = ((x * 7.0, y * 0.2) for x, y in stream) if transcoder else (x * 7.0 for x in stream)
    config = dict(trainer=JumpReluTrainer, activation_dim=D, dict_size=64, lr=1e-3, steps=20,
                  warmup_steps=2, sparsity_warmup_steps=5, target_l0=K, bandwidth=0.05, seed=0,
                  layer=0, lm_name="planted")
    if transcoder:
        config.update(output_dim=12, transcoder=True)
    [trainer] = trainSAE(stream, [config], 20, save_dir=tmp_path, normalize_activations=True,
                         normalization_batches=4, progress=False)
    loaded, saved = load_dictionary(tmp_path / "trainer_0")
    scale_in, scale_out = saved["trainer"]["normalization_scales"]
    assert 0.01 < scale_in < 0.5
    raw = next(planted_stream(features, K, 32, 1, seed=7)) * 7.0
    # the saved dictionary works on raw activations: loaded(x) == trained(scale_in * x) / scale_out
    torch.testing.assert_close(loaded(raw), trainer.ae(raw * scale_in) / scale_out, atol=1e-4,
                               rtol=1e-4)


def write_sae_lens_folder(path, ae, apply_b_dec_to_input, architecture="jumprelu"):
    from safetensors.torch import save_file

    path.mkdir()
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()},
              str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({
        "architecture": architecture, "d_in": ae.activation_dim, "d_sae": ae.dict_size,
        "dtype": "float32", "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none", "metadata": {"sae_lens_version": "6.0.0"}}))


def test_sae_lens_folder_loads_and_saves_with_same_outputs(tmp_path):
    source = randomised(JumpReluAutoEncoder(8, 24))
    write_sae_lens_folder(tmp_path / "sae_lens", source, apply_b_dec_to_input=True)
    ae = JumpReluAutoEncoder.from_pretrained(tmp_path / "sae_lens", load_from_sae_lens=True)
    assert ae.apply_b_dec_to_input
    x = torch.randn(16, 8)
    params = {k: v.double() for k, v in source.state_dict().items()}
    f_ref, _ = reference_encode(params, x.double(), subtract_b_dec=True)
    torch.testing.assert_close(ae.encode(x).double(), f_ref, atol=1e-5, rtol=1e-5)
    # saved here, the switch is folded into b_enc: the file gives the same outputs in any loader
    save_dictionary(ae, tmp_path / "saved")
    loaded, _ = load_dictionary(tmp_path / "saved")
    assert not loaded.apply_b_dec_to_input
    torch.testing.assert_close(loaded(x), ae(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.encode(x), ae.encode(x), atol=1e-5, rtol=1e-5)
    write_sae_lens_folder(tmp_path / "standard", source, True, architecture="standard")
    with pytest.raises(ValueError, match="jumprelu"):
        JumpReluAutoEncoder.from_pretrained(tmp_path / "standard", load_from_sae_lens=True)
    with pytest.raises(ValueError, match="does not download"):
        JumpReluAutoEncoder.from_pretrained(load_from_sae_lens=True, release="gemma-scope",
                                            sae_id="layer_0")


# --------------------------------------------------------------------------------------------------
# trainSAE: next to a TopK trainer, saved, interrupted and resumed


@pytest.mark.parametrize("normalize", [False, True])
def test_trainsae_with_topk_resumes_exactly(tmp_path, normalize):
    features = planted_features(N_TRUE, D, seed=0)
    steps = 24
    configs = [dict(trainer=JumpReluTrainer, activation_dim=D, dict_size=64, lr=1e-3, steps=steps,
                    warmup_steps=3, sparsity_warmup_steps=6, target_l0=K, bandwidth=0.05, seed=0),
               dict(trainer=TopKTrainer, dict_class=AutoEncoderTopK, activation_dim=D, dict_size=64,
                    k=K, lr=1e-3, steps=steps, warmup_steps=3, seed=1)]
    kwargs = dict(normalize_activations=normalize, normalization_batches=2, progress=False)
    straight = trainSAE(planted_stream(features, K, 64, 40, seed=4), configs, steps,
                        save_dir=tmp_path / "a", **kwargs)
    with pytest.raises(Crash):
        trainSAE(crashing(planted_stream(features, K, 64, 40, seed=4), after=17), configs, steps,
                 save_dir=tmp_path / "b", checkpoint_steps=5, **kwargs)
    resumed = trainSAE(planted_stream(features, K, 64, 40, seed=4), configs, steps,
                       save_dir=tmp_path / "b", resume=True, **kwargs)
    for a, b in zip(straight, resumed):
        for (name, p), q in zip(a.ae.state_dict().items(), b.ae.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    saved_a, config = load_dictionary(tmp_path / "a" / "trainer_0")
    saved_b, _ = load_dictionary(tmp_path / "b" / "trainer_0")
    assert (type(saved_a) is JumpReluAutoEncoder
            and config["trainer"]["trainer_class"] == "JumpReluTrainer")
    for p, q in zip(saved_a.state_dict().values(), saved_b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

"""Matryoshka BatchTopK: the dictionary's forward and the trainer's nested loss and every gradient
(AuxK included) against a plain float64 autograd reference of upstream's algorithm, one whole update
step, recovery of a planted dictionary, saves and loads (also as transcoder and after normalisation
folding) and trainSAE resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning.dictionary import MatryoshkaBatchTopKSAE, dictionary_from_config
from dictionary_learning.dictionary.matryoshka import largest
from dictionary_learning.trainers import TopKTrainer, parts
from dictionary_learning.trainers.matryoshka_batch_top_k import (
    MatryoshkaBatchTopKTrainer,
    apply_temperature,
)
from dictionary_learning.training import build_trainer, trainSAE
from dictionary_learning.utils import load_dictionary, save_dictionary

from ..helpers import fraction_recovered, planted_features, planted_stream


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread is faster, and on a shared machine many threads wait on each other
    (~40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# plain float64 references of upstream's algorithm (dense codes, one matmul per group)


def reference_codes(ae, x, use_threshold=True, k=None):
    """(codes, post-relu pre-activations) of `ae`'s weights, computed densely."""
    encoder_in = x if ae.transcoder else x - ae.b_dec
    post = F.relu(encoder_in @ ae.W_enc + ae.b_enc)
    if use_threshold:
        codes = post * (post > ae.threshold)
    else:
        flat = post.flatten()
        top = flat.topk((k or int(ae.k)) * x.shape[0])
        codes = torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(post.shape)
    end = sum(ae.group_sizes.tolist()[:ae.active_groups])
    mask = torch.arange(ae.dict_size) < end
    return codes * mask, post


def reference_loss(ae, x, y, weights, dead_before, top_k_aux, auxk_alpha):
    """(loss, codes, fired latents, auxk loss) as upstream's trainer computes them; `dead_before`:
    latents already counted as dead before this batch (a latent firing now is alive again)."""
    f, post = reference_codes(ae, x, use_threshold=False)
    reconstruction = ae.b_dec + (x @ ae.skip.weight.T if ae.skip is not None else 0)
    losses, start = [], 0
    for size, weight in zip(ae.group_sizes.tolist()[:ae.active_groups], weights):
        reconstruction = reconstruction + f[:, start:start + size] @ ae.W_dec[start:start + size]
        losses.append(weight * (y - reconstruction).pow(2).sum(-1).mean())
        start += size
    fired = f.sum(0) > 0
    dead = dead_before & ~fired
    residual = (y - reconstruction).detach()
    k_aux = min(top_k_aux, int(dead.sum()))
    values, indices = torch.where(dead, post, -math.inf).topk(k_aux)
    auxk_codes = torch.zeros_like(post).scatter(1, indices, values)
    error = (residual - auxk_codes @ ae.W_dec).pow(2).sum(-1).mean()
    auxk = error / (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return torch.stack(losses).mean() + auxk_alpha * auxk, f, fired, auxk


def make_trainer(d=12, dict_size=48, k=3, output_dim=None, skip=False, **kwargs):
    trainer = MatryoshkaBatchTopKTrainer(
        20, d, dict_size, k, group_fractions=[0.25, 0.25, 0.5], group_weights=[0.5, 0.3, 0.2],
        warmup_steps=0, threshold_start_step=0, seed=0, dead_feature_threshold=1000,
        output_dim=output_dim, transcoder=output_dim is not None or skip, skip=skip, auxk_alpha=0.5,
        **kwargs)
    trainer.ae.double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial biases and skip, so every path carries gradient
        for p in (trainer.ae.b_enc, trainer.ae.b_dec):
            p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
        if skip:
            trainer.ae.skip.weight.copy_(0.1 * torch.randn(trainer.ae.skip.weight.shape,
                                                           generator=generator,
                                                           dtype=torch.float64))
    dead = torch.rand(dict_size, generator=generator) < 0.4
    # these count as dead unless they fire in the batch
    trainer.num_tokens_since_fired[dead] = 10**6
    return trainer, dead


def batch(trainer, n=16, seed=2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, trainer.ae.activation_dim, generator=generator, dtype=torch.float64)
    if not trainer.ae.transcoder:
        return x, x
    return x, torch.randn(n, trainer.ae.output_dim, generator=generator, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# forward and gradients


@pytest.mark.parametrize("auxk_path", ["dense_over_dead", "sparse"])
@pytest.mark.parametrize("case", ["sae", "transcoder_skip", "two_active_groups"])
def test_nested_loss_and_every_gradient_match_float64_reference(case, auxk_path, monkeypatch):
    monkeypatch.setattr(parts, "DENSE_AUXK_SHARE", 0.0 if auxk_path == "dense_over_dead" else 1e9)
    trainer, dead_before = make_trainer(**({"output_dim": 10, "skip": True}
                                           if case == "transcoder_skip" else {}))
    ae = trainer.ae
    if case == "two_active_groups":
        ae.active_groups = 2
    x, y = batch(trainer)
    # the step's loss; its state changes come after the optimizer step
    out = trainer.step_loss(x, y, 5)
    loss = out.loss
    loss.backward()
    ours = {name: p.grad.clone() for name, p in ae.named_parameters()}
    ae.zero_grad()
    expected, f, fired, auxk = reference_loss(ae, x, y, trainer.group_weights, dead_before,
                                              trainer.top_k_aux, 0.5)
    expected.backward(retain_graph=True)
    assert auxk.item() > 0 and out.state["dead_features"] == int((dead_before & ~fired).sum()) > 0
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for name, p in ae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    # the AuxK term reaches the encoder: its gradient share is far from negligible
    ae.zero_grad()
    (0.5 * auxk).backward()
    assert ae.W_enc.grad.norm() > 0.05 * ours["W_enc"].norm()
    # threshold: the smallest kept code; tracking: exactly the fired latents are reset
    trainer.after_step(5, x, y, out)
    assert ae.threshold.item() == pytest.approx(f[f > 0].min().item(), rel=1e-6)
    assert torch.equal(trainer.num_tokens_since_fired == 0, fired)
    if case == "two_active_groups":
        assert fired[24:].sum() == 0


@pytest.mark.parametrize("auxk_path", ["dense_over_dead", "sparse"])
def test_loss_gradcheck(auxk_path, monkeypatch):
    """torch.autograd.gradcheck in every parameter, tiny shapes: the nested loss, and AuxK for a
    fixed residual (the loss detaches AuxK's residual, as upstream, so finite differences of the sum
    would not match by design)."""
    monkeypatch.setattr(parts, "DENSE_AUXK_SHARE", 0.0 if auxk_path == "dense_over_dead" else 1e9)
    trainer, _ = make_trainer(d=5, dict_size=16, k=2, output_dim=4, skip=True)
    x, y = batch(trainer, n=6)
    dead = trainer.dead.mask(trainer.cfg.dead_feature_threshold)
    residual = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    class Terms(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ae = trainer.ae

        def forward(self, x, y):
            trainer.auxk_alpha = 0.0
            nested = trainer.loss(x, y=y, step=5)
            trainer.auxk_alpha = 0.5
            auxk = parts.auxk_loss(self.ae, x, residual, self.ae.pre_activations(x), dead,
                                   trainer.top_k_aux, lambda value: value)
            return nested, auxk[0]

    module = Terms()
    names = [f"ae.{name}" for name, _ in trainer.ae.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in trainer.ae.parameters())
    nested, auxk = module(x, y)
    assert nested.item() > 0 and auxk.item() > 0 and dead.any()
    assert torch.autograd.gradcheck(
        lambda *p: torch.func.functional_call(module, dict(zip(names, p)), (x, y)), params)


def test_upstream_loss_call_form_and_dense_auxiliary_loss():
    trainer, dead_before = make_trainer()
    x, _ = batch(trainer)
    state = trainer.num_tokens_since_fired.clone()
    log = trainer.loss(x, step=0, logging=True)
    expected, f, fired, auxk = reference_loss(trainer.ae, x, x, trainer.group_weights, dead_before,
                                              trainer.top_k_aux, 0.5)
    assert log.losses["loss"] == pytest.approx(expected.item(), rel=1e-10)
    assert log.losses["auxk_loss"] == pytest.approx(auxk.item(), rel=1e-10)
    torch.testing.assert_close(log.f, f.detach())
    # upstream's dense get_auxiliary_loss, fed the post-relu codes, gives the same AuxK and
    # gradients
    trainer.num_tokens_since_fired.copy_(state)
    trainer.dead.update(fired, x.shape[0])
    _, post = reference_codes(trainer.ae, x, use_threshold=False)
    residual = (x - log.x_hat).detach()
    dense = trainer.get_auxiliary_loss(residual, post)
    torch.testing.assert_close(dense, auxk, rtol=1e-10, atol=0)
    dense.backward()
    ours = {name: p.grad.clone() for name, p in trainer.ae.named_parameters()}
    trainer.ae.zero_grad()
    auxk.backward()
    for name, p in trainer.ae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_dictionary_encode_decode_forward_match_reference():
    torch.manual_seed(0)
    ae = MatryoshkaBatchTopKSAE(8, 32, 2, [8, 8, 16]).double()
    with torch.no_grad():
        ae.b_enc.copy_(0.2 * torch.randn(32, dtype=torch.float64))
        ae.b_dec.copy_(0.2 * torch.randn(8, dtype=torch.float64))
    x = torch.randn(10, 8, dtype=torch.float64)
    # no threshold learned yet: upstream passes every positive code; the explicit option falls back
    # to batch top-k
    codes, post = reference_codes(ae, x)
    assert (codes > 0).sum() > 2 * 10
    torch.testing.assert_close(ae.encode(x), codes)
    torch.testing.assert_close(ae(x), codes @ ae.W_dec + ae.b_dec)
    ae.batch_topk_fallback = True
    torch.testing.assert_close(ae.encode(x), reference_codes(ae, x, use_threshold=False)[0])
    ae.batch_topk_fallback = False
    torch.testing.assert_close(ae.encode(x, use_threshold=False),
                               reference_codes(ae, x, use_threshold=False)[0])
    ae.threshold.fill_(0.3)
    codes, post = reference_codes(ae, x)
    f, active, post_relu = ae.encode(x, return_active=True)
    torch.testing.assert_close(f, codes)
    torch.testing.assert_close(post_relu, post)
    assert torch.equal(active, codes.sum(0) > 0)
    x_hat, features = ae(x, output_features=True)
    torch.testing.assert_close(x_hat, codes @ ae.W_dec + ae.b_dec)
    torch.testing.assert_close(ae.decode(features), x_hat)
    ae.active_groups = 1  # codes of the later groups are zeroed
    assert (ae.encode(x)[:, 8:].abs().sum() == 0
            and ae.encode(x, use_threshold=False)[:, 8:].abs().sum() == 0)
    # the sparse training path's prefix reconstructions equal the dense per-group sums
    ae.active_groups = 3
    code = ae.sparse_code(x)
    dense = code.to_dense(32)
    torch.testing.assert_close(dense, reference_codes(ae, x, use_threshold=False)[0])
    prefixes = ae.decode_prefixes(code)
    for g, end in enumerate([8, 16, 32]):
        torch.testing.assert_close(prefixes[g], dense[:, :end] @ ae.W_dec[:end] + ae.b_dec)


@pytest.mark.parametrize("numel,n,ties",
                         [(300_000, 9_000, False), (300_000, 9_000, True), (500, 40, False),
                                           (500, 500, False)])
def test_largest_equals_topk(numel, n, ties):
    generator = torch.Generator().manual_seed(numel + n)
    values = torch.randn(numel, generator=generator)
    # few distinct values: the sampled threshold cannot separate n entries, so the fallbacks run
    if ties:
        values = values.round()
    indices, top = largest(values, n)
    assert torch.equal(indices, indices.sort().values) and len(indices.unique()) == n
    assert torch.equal(values[indices], top)
    assert torch.equal(top.sort().values, values.topk(n).values.sort().values)


def test_one_update_step_matches_upstream_recipe():
    """Projection of the decoder gradient, clipping to norm 1, Adam, renormalised decoder rows, k
    annealing."""
    trainer, dead_before = make_trainer(k_anneal_steps=8, lr=1e-2)
    x, _ = batch(trainer)
    trainer.b_dec_initialised = True
    params = {name: p.detach().clone().requires_grad_()
              for name, p in trainer.ae.named_parameters()}
    reference = MatryoshkaBatchTopKSAE(12, 48, 3, [12, 12, 24]).double()
    reference.load_state_dict(trainer.ae.state_dict())
    loss, *_ = reference_loss(reference, x, x, trainer.group_weights, dead_before,
                              trainer.top_k_aux, 0.5)
    loss.backward()
    with torch.no_grad():
        w, g = reference.W_dec, reference.W_dec.grad
        unit = w / (w.norm(dim=1, keepdim=True) + 1e-6)
        g -= (g * unit).sum(1, keepdim=True) * unit
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    optimizer.step()
    with torch.no_grad():
        reference.W_dec /= (reference.W_dec.norm(dim=1, keepdim=True)
                            + torch.finfo(torch.float64).eps)
    trainer.update(2, x)
    for name, p in trainer.ae.named_parameters():
        assert not torch.equal(p, params[name]), name
        torch.testing.assert_close(p, dict(reference.named_parameters())[name], rtol=1e-9,
                                   atol=1e-12, msg=name)
    assert int(trainer.ae.k) == int(12 * (1 - 2 / 8) + 3 * 2 / 8)  # upstream's: step 3 uses k(2)


def test_first_update_puts_b_dec_at_geometric_median():
    trainer = MatryoshkaBatchTopKTrainer(10, 6, 24, 2, group_fractions=[0.5, 0.5], warmup_steps=5,
                                         seed=0)
    x = torch.randn(64, 6) * 3 + 1
    trainer.update(0, x)  # upstream's schedule: lr 0 at step 0, so b_dec stays where it was put
    m = trainer.ae.b_dec.detach().double()
    directions = (x.double() - m) / (x.double() - m).norm(dim=1, keepdim=True)
    assert directions.sum(0).norm() < 1e-3 * len(x)  # the geometric median's optimality condition


def test_apply_temperature_and_group_split():
    p = [0.1, 0.2, 0.7]
    for temperature in (0.5, 1.0, 3.0):
        powered = [q ** (1 / temperature) for q in p]
        assert apply_temperature(p, temperature) == pytest.approx([q / sum(powered)
                                                                   for q in powered], rel=1e-6)
    trainer = MatryoshkaBatchTopKTrainer(5, 8, 100, 2, 3, "lm", [0.33, 0.33, 0.34])
    assert trainer.group_sizes == [33, 33, 34] and trainer.ae.group_sizes.tolist() == [33, 33, 34]
    assert trainer.group_weights == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("kwargs,match", [
    ({"group_fractions": [0.5, 0.4]}, "must sum to 1.0"),
    ({"group_fractions": None}, "group_fractions is required"),
    ({"group_weights": [1.0]}, "one weight per group"),
    ({"k_anneal_steps": 10}, r"k_anneal_steps must be an int in \(0, steps=10\)"),
    ({"group_fractions": [0.001, 0.999]}, "group_sizes must all be positive ints"),
])
def test_bad_configs_raise(kwargs, match):
    config = {"steps": 10, "activation_dim": 8, "dict_size": 64, "k": 2,
              "group_fractions": [0.5, 0.5]} | kwargs
    with pytest.raises(ValueError, match=match):
        MatryoshkaBatchTopKTrainer(**config)
    with pytest.raises(ValueError, match="must sum to dict_size=32"):
        MatryoshkaBatchTopKSAE(8, 32, 2, [8, 8])


# --------------------------------------------------------------------------------------------------
# planted dictionary

D, N_TRUE, K = 32, 128, 3


def matryoshka_config(steps, **overrides):
    config = {"trainer": MatryoshkaBatchTopKTrainer, "activation_dim": D, "dict_size": 2 * N_TRUE,
              "k": K, "group_fractions": [0.25, 0.25, 0.5], "lr": 3e-3, "steps": steps,
              "warmup_steps": 20, "threshold_start_step": 100, "seed": 0,
              "dead_feature_threshold": 20_000}
    config.update(overrides)
    return config


def fvu(x, x_hat):
    return ((x - x_hat).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()).item()


@pytest.mark.slow
def test_recovers_planted_features_and_orders_them():
    """64 planted directions in 64 dimensions, 3 active per token: the whole dictionary recovers >=
    90% of them at cosine >= 0.9, and the first group alone reconstructs far better than as many
    latents of the last group (the nesting). With more superposition the nested losses mix
    directions: 75% at 64 in 32 dimensions, 48% at 128 in 32 (upstream's trainer gets the same 48%
    there; plain BatchTopK 74%)."""
    features = planted_features(64, 64, seed=0)
    steps = 800
    config = matryoshka_config(steps, activation_dim=64, dict_size=128)
    [trainer] = trainSAE(planted_stream(features, 3, 256, steps, seed=1), [config], steps,
                         progress=False)
    ae = trainer.ae
    recovered = fraction_recovered(features, ae.W_dec.detach().t())
    print(f"planted recovery: {recovered:.1%} of 64 features at cosine >= 0.9")
    assert recovered >= 0.9, f"only {recovered:.0%} of planted features recovered at cosine >= 0.9"
    x = next(planted_stream(features, 3, 1024, 1, seed=9))
    with torch.no_grad():
        codes = ae.encode(x, use_threshold=False)
        first = fvu(x, codes[:, :32] @ ae.W_dec[:32] + ae.b_dec)
        last = fvu(x, codes[:, -32:] @ ae.W_dec[-32:] + ae.b_dec)
        print(f"FVU: all {fvu(x, ae(x)):.3f}, first group alone {first:.3f}, last 32 latents alone "
              f"{last:.3f}")
        assert fvu(x, ae(x)) < 0.1 and first < 0.75 * last, (first, last)



# --------------------------------------------------------------------------------------------------
# saving, loading, normalisation folding, trainSAE


def random_dictionary(output_dim=None, skip=False, transcoder=False, seed=0):
    torch.manual_seed(seed)
    ae = MatryoshkaBatchTopKSAE(8, 24, 3, [6, 6, 12], output_dim=output_dim, transcoder=transcoder,
                                skip=skip)
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        ae.threshold.fill_(0.05)
    return ae


@pytest.mark.parametrize("case", ["sae", "transcoder_skip", "square_transcoder"])
def test_save_load_round_trip(tmp_path, case):
    kwargs = {"sae": {}, "transcoder_skip": {"output_dim": 5, "skip": True},
              "square_transcoder": {"transcoder": True}}[case]
    ae = random_dictionary(**kwargs)
    save_dictionary(ae, tmp_path,
                    {"trainer": {"trainer_class": "MatryoshkaBatchTopKTrainer", "lm_name": "m"}})
    loaded, config = load_dictionary(tmp_path)
    assert type(loaded) is MatryoshkaBatchTopKSAE and loaded.transcoder == (case != "sae")
    assert config["trainer"]["k"] == 3 and config["trainer"]["group_sizes"] == [6, 6, 12]
    state = torch.load(tmp_path / "ae.pt", weights_only=True)
    expected_keys = {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"}
    if case != "sae":
        expected_keys |= {"is_transcoder"} | ({"skip.weight"} if case == "transcoder_skip"
                                              else set())
    assert set(state) == expected_keys
    x = torch.randn(6, 8)
    for a, b in ((ae, loaded),
                 (ae, MatryoshkaBatchTopKSAE.from_pretrained(tmp_path / "ae.pt", k=3))):
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        torch.testing.assert_close(b.encode(x, use_threshold=False),
                                   a.encode(x, use_threshold=False), rtol=0, atol=0)
        f = a.encode(x)
        torch.testing.assert_close(b.decode(f, x), a.decode(f, x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="k=4 was asked for"):
        MatryoshkaBatchTopKSAE.from_pretrained(tmp_path / "ae.pt", k=4)
    rebuilt = dictionary_from_config(config["trainer"])
    assert ({k: v.shape for k, v in rebuilt.state_dict().items()}
            == {k: v.shape for k, v in ae.state_dict().items()})


@pytest.mark.parametrize("transcoder", [False, True])
def test_normalisation_is_folded_into_saved_weights(tmp_path, transcoder):
    features = planted_features(N_TRUE, D, seed=0)
    if transcoder:
        stream = ((x * 7.0, y * 0.2)
                  for x, y in planted_stream(features, K, 64, 60, seed=6,
                                             features_out=planted_features(N_TRUE, 20, seed=3)))
        config = matryoshka_config(40, threshold_start_step=5, output_dim=20, transcoder=True)
    else:
        # far from unit scale
        stream = (x * 7.0 for x in planted_stream(features, K, 64, 60, seed=6))
        config = matryoshka_config(40, threshold_start_step=5, lm_name="planted", layer=0)
    [trainer] = trainSAE(stream, [config], 40, save_dir=tmp_path, normalize_activations=True,
                         normalization_batches=4, progress=False)
    loaded, saved = load_dictionary(tmp_path / "trainer_0")
    assert (saved["trainer"]["trainer_class"] == "MatryoshkaBatchTopKTrainer"
            and loaded.threshold > 0)
    scale_in, scale_out = saved["trainer"]["normalization_scales"]
    assert 0.01 < scale_in < 0.5 and (scale_out != scale_in) == transcoder
    raw = next(planted_stream(features, K, 32, 1, seed=7)) * 7.0
    # the saved dictionary works on raw activations: loaded(x) == trained(scale_in * x) / scale_out
    torch.testing.assert_close(loaded(raw), trainer.ae(raw * scale_in) / scale_out, atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(loaded.encode(raw), trainer.ae.encode(raw * scale_in) / scale_in,
                               atol=1e-4, rtol=1e-4)


def test_trainSAE_next_to_topk_resumes_exactly(tmp_path):
    features = planted_features(N_TRUE, D, seed=0)
    steps = 24
    configs = [matryoshka_config(steps, threshold_start_step=5, k_anneal_steps=10,
                                 dead_feature_threshold=500),
               {"trainer": "TopKTrainer", "dict_class": "AutoEncoderTopK", "activation_dim": D,
                "dict_size": 2 * N_TRUE, "k": K, "lr": 2e-3, "steps": steps, "warmup_steps": 5,
                "seed": 3}]
    straight = trainSAE(planted_stream(features, K, 64, 40, seed=4), configs, steps,
                        save_dir=tmp_path / "a", progress=False)
    assert isinstance(straight[1], TopKTrainer) and int(straight[0].ae.k) == K  # annealed down to k
    assert straight[0].ae.threshold > 0

    def crashing(stream, after):
        for i, item in enumerate(stream):
            if i == after:
                raise RuntimeError("interrupted")
            yield item

    with pytest.raises(RuntimeError, match="interrupted"):
        trainSAE(crashing(planted_stream(features, K, 64, 40, seed=4), after=17), configs, steps,
                 save_dir=tmp_path / "b", checkpoint_steps=5, progress=False)
    resumed = trainSAE(planted_stream(features, K, 64, 40, seed=4), configs, steps,
                       save_dir=tmp_path / "b", resume=True, progress=False)
    for a, b in zip(straight, resumed):
        for (name, x), y in zip(a.ae.state_dict().items(), b.ae.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    saved = json.loads((tmp_path / "a" / "trainer_0" / "config.json").read_text())["trainer"]
    for key in ("dict_class", "k", "group_sizes", "group_fractions", "group_weights", "top_k_aux",
                "threshold_start_step"):
        assert key in saved, key
    loaded_a, _ = load_dictionary(tmp_path / "a" / "trainer_0")
    loaded_b, _ = load_dictionary(tmp_path / "b" / "trainer_0")
    for x, y in zip(loaded_a.state_dict().values(), loaded_b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_build_trainer_from_upstream_style_config():
    trainer = build_trainer({"trainer": "MatryoshkaBatchTopKTrainer",
                             "dict_class": "MatryoshkaBatchTopKSAE",
                             "activation_dim": 8, "dict_size": 32, "k": 2, "layer": 1,
                             "lm_name": "m", "steps": 10, "group_fractions": [0.5, 0.5],
                             "group_weights": [0.7, 0.3], "lr": 1e-3, "device": "cpu"})
    assert (trainer.ae.group_sizes.tolist() == [16, 16]
            and trainer.config["group_weights"] == [0.7, 0.3])
    with pytest.raises(ValueError, match="unknown MatryoshkaBatchTopKTrainer config keys"):
        build_trainer({"trainer": MatryoshkaBatchTopKTrainer, "activation_dim": 8, "dict_size": 32,
                       "k": 2, "steps": 10, "group_fractions": [1.0], "l1_penalty": 4})

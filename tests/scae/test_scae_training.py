"""SCAE fine-tuning: CE gradients, a lower loss, resuming, decoder norms."""

import pytest
import torch

from dictionary_learning.scae import SCAESuite

from ..helpers import CTX, make_suite, random_texts


def test_ce_gradients_reach_every_trained_parameter(eager_model):
    from dictionary_learning.scae import SCAETrainer, select_connections

    suite = make_suite(eager_model, n_layer=2)
    texts = random_texts(4, seed=27, max_words=6)
    connections = select_connections(suite, eager_model, texts, 8, ctx_len=CTX)
    trainer = SCAETrainer(suite, eager_model, connections, steps=3, mse_weight=0.0, ce_weight=1.0,
                          ctx_len=CTX)
    loss = trainer.loss(texts)
    loss.backward()
    for name, parameter in suite.named_parameters():
        assert (parameter.grad is not None
                and parameter.grad.abs().sum() > 0), f"no CE gradient reaches {name}"
    # the model itself is frozen
    assert all(p.grad is None for p in eager_model._module.parameters())


def test_fine_tuning_lowers_the_loss_and_resumes(tmp_path, eager_model):
    from dictionary_learning.scae import select_connections, train_scae_suite, virtual_weights

    texts = random_texts(48, seed=28, max_words=6)
    suite = make_suite(eager_model, n_layer=2)
    connections = select_connections(suite, eager_model, texts[:8], 8, ctx_len=CTX)
    kwargs = dict(steps=6, batch_texts=4, lr=3e-3, ctx_len=CTX, progress=False)
    straight = train_scae_suite(make_suite(eager_model, n_layer=2), eager_model, iter(texts),
                                connections, save_dir=tmp_path / "a", **kwargs)
    before = SCAESuite.load(tmp_path / "a" / "suite")
    first = make_suite(eager_model, n_layer=2)
    from dictionary_learning.scae import SCAETrainer
    start_loss = (SCAETrainer(first, eager_model, connections, steps=1, ctx_len=CTX)
                  .loss(texts[:4]).item())
    assert straight.last_metrics["loss"] < start_loss

    def crashing():
        for i, text in enumerate(texts):
            if i == 14:  # during step 3 (4 texts a step)
                raise RuntimeError("crash")
            yield text

    with pytest.raises(RuntimeError):
        train_scae_suite(make_suite(eager_model, n_layer=2), eager_model, crashing(), connections,
                         save_dir=tmp_path / "b", checkpoint_steps=2, **kwargs)
    resumed = train_scae_suite(make_suite(eager_model, n_layer=2), eager_model, iter(texts),
                               connections, save_dir=tmp_path / "b", resume=True,
                               checkpoint_steps=2, **kwargs)
    # equal up to float noise: the gather backward accumulates in a thread-dependent order (two
    # uninterrupted runs differ by ~1e-6 too)
    for (name, a), b in zip(straight.suite.state_dict().items(),
                            resumed.suite.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    for (name, a), b in zip(before.state_dict().items(), straight.suite.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # saved with the suite: the same connections, weights of the tuned parameters
    loaded = before.connections
    assert all(torch.equal(loaded.indices[n], connections.indices[n]) for n in connections.indices)
    tuned = virtual_weights(straight.suite, eager_model, "attn_1", connections.indices["attn_1"])
    torch.testing.assert_close(loaded.weights["attn_1"], tuned)
    assert not torch.allclose(tuned, connections.weights["attn_1"])


def test_fine_tuning_keeps_decoder_column_norms(eager_model):
    """Folded transcoders have decoder columns of norm c_in / c_out, not 1: a step must not reset
    them."""
    from dictionary_learning.scae import SCAETrainer, all_connections

    suite = make_suite(eager_model, n_layer=1)
    with torch.no_grad():
        suite["mlp_0"].decoder.weight.mul_(3.0)
    norms = suite["mlp_0"].decoder.weight.norm(dim=0).clone()
    trainer = SCAETrainer(suite, eager_model, all_connections(suite, eager_model), steps=2, lr=1e-3,
                          ctx_len=CTX)
    trainer.update(0, random_texts(2, seed=30, max_words=5))
    torch.testing.assert_close(suite["mlp_0"].decoder.weight.norm(dim=0), norms)


def test_fine_tuning_refuses_what_would_train_nothing(tmp_path, eager_model):
    """batch_texts=0 or an empty text stream used to save the untouched suite as tuned."""
    from dictionary_learning.scae import select_connections, train_scae_suite

    suite = make_suite(eager_model, n_layer=2)
    connections = select_connections(suite, eager_model, random_texts(4, seed=29, max_words=6), 8,
                                     ctx_len=CTX)
    with pytest.raises(ValueError, match="batch_texts must be a positive int, got 0"):
        train_scae_suite(suite, eager_model, iter(["a text"]), connections, steps=2, batch_texts=0,
                         progress=False)
    with pytest.raises(TypeError, match="single string"):
        train_scae_suite(suite, eager_model, "a text", connections, steps=2, progress=False)
    with pytest.raises(ValueError, match="no batches"), pytest.warns(UserWarning, match="ran out"):
        train_scae_suite(suite, eager_model, iter([]), connections, steps=2, save_dir=tmp_path,
                         ctx_len=CTX, progress=False)
    assert not (tmp_path / "suite").exists()


def test_reference_schedule_lrs_stagger_and_auxk(eager_model):
    """The reference fork's recipe: one lr per module scaled by its size, warmup then linear decay
    to 0 from decay_start, module p's MSE switched on after p * stagger_steps, AuxK on dead
    features, KL beside CE. The warmup is the toolkit's one lr schedule (upstream
    dictionary_learning's step / warmup_steps; the fork's is one step ahead, (step + 1) /
    warmup_steps)."""
    from dictionary_learning.scae import SCAETrainer, select_connections

    suite = make_suite(eager_model, n_layer=2)
    texts = random_texts(4, seed=29, max_words=6)
    connections = select_connections(suite, eager_model, texts, 8, ctx_len=CTX)
    trainer = SCAETrainer(suite, eager_model, connections, steps=10, ctx_len=CTX, warmup_steps=2,
                          decay_start=0.5)
    assert [group["initial_lr"] for group in trainer.optimizer.param_groups] == \
        [2e-4 / (96 / 2 ** 14) ** 0.5] * len(suite.names)
    factors = [trainer.scheduler.lr_lambdas[0](step) for step in range(10)]
    assert factors == pytest.approx([0, 0.5, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])

    # stagger: at step 0 only the first module's MSE counts, so no MSE gradient reaches the last
    # module's decoder
    staggered = SCAETrainer(suite, eager_model, connections, steps=10, ctx_len=CTX, mse_weight=1.0,
                            ce_weight=0.0, auxk_alpha=0.0, stagger_steps=5)
    staggered.loss(texts, step=0).backward()
    last = suite[suite.names[-1]].decoder.weight
    assert last.grad is None or last.grad.abs().sum() == 0
    suite.zero_grad(set_to_none=True)
    staggered.loss(texts, step=5 * (len(suite.names) - 1)).backward()
    assert last.grad.abs().sum() > 0
    suite.zero_grad(set_to_none=True)

    # AuxK: with a threshold of one token, features that did not fire are dead at once and are
    # fitted to the residual
    auxk = SCAETrainer(suite, eager_model, connections, steps=10, ctx_len=CTX, mse_weight=1.0,
                       ce_weight=0.0, auxk_alpha=1.0, dead_feature_threshold=1)
    # a step's loss changes nothing; update counts the tokens after it
    _, _, fired, n_tokens = auxk.step_loss(texts)
    for name, counts in auxk.dead.items():
        counts.update(fired[name], n_tokens)
    dead = (auxk.num_tokens_since_fired["mlp_0"] >= 1).nonzero().flatten()
    assert dead.numel() > 0
    loss, metrics, _, _ = auxk.step_loss(texts)
    loss.backward()
    assert metrics["auxk"] > 0
    assert suite["mlp_0"].decoder.weight.grad[:, dead].abs().sum() > 0
    suite.zero_grad(set_to_none=True)

    # KL beside CE: the gradient reaches the suite, never the model
    kl = SCAETrainer(suite, eager_model, connections, steps=10, ctx_len=CTX, mse_weight=0.0,
                     ce_weight=0.0, kl_weight=1.0, auxk_alpha=0.0)
    loss, metrics, _, _ = kl.step_loss(texts)
    loss.backward()
    assert metrics["kl"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in suite.named_parameters()
               if n.endswith("encoder.weight"))
    assert all(p.grad is None for p in eager_model._module.parameters())
    with pytest.raises(ValueError, match="must not all be 0"):
        SCAETrainer(suite, eager_model, connections, steps=10, mse_weight=0.0, ce_weight=0.0)
    with pytest.raises(ValueError, match="decay_start"):
        SCAETrainer(suite, eager_model, connections, steps=10, decay_start=1.5)
    # the config three ways: keywords, steps positionally, an SCAEConfig (keywords replace fields)
    from dictionary_learning.scae.training import SCAEConfig

    by_keywords = SCAETrainer(suite, eager_model, connections, steps=7, lr=1e-3, ctx_len=CTX)
    positional = SCAETrainer(suite, eager_model, connections, 7, lr=1e-3, ctx_len=CTX)
    from_config = SCAETrainer(suite, eager_model, connections,
                              config=SCAEConfig(steps=7, lr=1e-2, ctx_len=CTX), lr=1e-3)
    assert by_keywords.config == positional.config == from_config.config
    assert by_keywords.config["steps"] == 7 and by_keywords.config["lr"] == 1e-3
    with pytest.raises(TypeError, match="unexpected keyword.*'stepz'"):
        SCAETrainer(suite, eager_model, connections, stepz=7)


def test_random_connections_are_valid_distinct_and_not_the_selected_ones(eager_model):
    from dictionary_learning.scae import ce_versus_c, random_connections, select_connections

    suite = make_suite(eager_model, n_layer=3)
    texts = random_texts(8, seed=30, max_words=6)
    selected = select_connections(suite, eager_model, texts[:4], 6, ctx_len=CTX)
    drawn = random_connections(suite, 6, seed=1, model=eager_model)
    drawn.validate(suite, eager_model)  # in range, no feature lists a source feature twice
    again = random_connections(suite, 6, seed=1, model=eager_model)
    other = random_connections(suite, 6, seed=2, model=eager_model)
    overlap, total = 0, 0
    for name in suite.names:
        assert torch.equal(drawn.indices[name], again.indices[name])  # seeded
        if drawn.indices[name].shape[1] < suite.n_sources(name, eager_model):
            assert not torch.equal(drawn.indices[name], other.indices[name])
            rows = zip(drawn.indices[name].tolist(), selected.indices[name].tolist())
            overlap += sum(len(set(a) & set(b)) for a, b in rows)
            total += drawn.indices[name].numel()
    assert total and overlap / total < 0.5  # random draws rarely hit the selected connections
    rows = ce_versus_c(suite, eager_model, None, texts[4:], [2, 6], ctx_len=CTX, connections=drawn)
    assert [r["C"] for r in rows] == [2, 6] and all(r["ce_pruned"] > 0 for r in rows)

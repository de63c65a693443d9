"""SCAE fine-tuning: CE gradients, a lower loss, resuming, decoder norms."""

import pytest
import torch

from dictionary_learning.scae import SCAESuite

from .helpers import CTX, make_suite, random_texts


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


def test_fine_tuning_refuses_what_would_train_nothing(tmp_path, eager_model):
    """batch_texts=0 or an empty text stream used to save the untouched suite as tuned."""
    from dictionary_learning.scae import select_connections, train_scae_suite

    suite = make_suite(eager_model, n_layer=2)
    connections = select_connections(suite, eager_model, random_texts(4, seed=29, max_words=6), 8, ctx_len=CTX)
    with pytest.raises(ValueError, match="batch_texts must be a positive int, got 0"):
        train_scae_suite(suite, eager_model, iter(["a text"]), connections, steps=2, batch_texts=0, progress=False)
    with pytest.raises(TypeError, match="single string"):
        train_scae_suite(suite, eager_model, "a text", connections, steps=2, progress=False)
    with pytest.raises(ValueError, match="no batches"), pytest.warns(UserWarning, match="ran out"):
        train_scae_suite(suite, eager_model, iter([]), connections, steps=2, save_dir=tmp_path, ctx_len=CTX,
                         progress=False)
    assert not (tmp_path / "suite").exists()

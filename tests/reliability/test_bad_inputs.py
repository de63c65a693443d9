"""Inputs that used to give silently wrong results now raise a clear error naming what was expected
and what came (from the reliability sweep, ../shared/findings/reliability.md)."""

import json

import pytest

from dictionary_learning import ActivationBuffer
from dictionary_learning.dictionary import AutoEncoderTopK
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary, save_dictionary

from ..helpers import planted_features, planted_stream
from ..training.test_training import N_TRUE, D, K, topk_config


def test_a_string_is_not_a_stream(tiny_llama):
    with pytest.raises(TypeError, match="got a string"):
        trainSAE("not batches", [topk_config(5)], 5, progress=False)
    with pytest.raises(TypeError, match="got a string"):
        trainSAE("not batches", D, 2 * N_TRUE, lr=1e-3, sparsity_penalty=1e-3, progress=False)
    with pytest.raises(TypeError, match="single string"):
        ActivationBuffer("a text, not a list of texts", tiny_llama, "model.layers.0", n_ctxs=4,
                         ctx_len=8)


def test_an_empty_stream_saves_nothing(tmp_path):
    with pytest.raises(ValueError, match="no batches"), pytest.warns(UserWarning,
                                                                     match="ran out after 0 steps"):
        trainSAE(iter([]), [topk_config(5)], 5, save_dir=tmp_path, progress=False)
    assert not (tmp_path / "trainer_0" / "ae.pt").exists()


def test_an_sae_is_not_trained_on_pairs_with_other_targets():
    features = planted_features(N_TRUE, D, seed=0)
    pairs = ((x, x.flip(0)) for x in planted_stream(features, K, 32, 5, seed=1))
    with pytest.raises(ValueError, match="y != x"):
        trainSAE(pairs, [topk_config(5)], 5, progress=False)
    # (x, x) pairs are just an SAE's batches
    same = ((x, x) for x in planted_stream(features, K, 32, 5, seed=1))
    trainSAE(same, [topk_config(5)], 5, progress=False)


def test_a_folder_whose_config_disagrees_with_its_weights_is_refused(tmp_path):
    save_dictionary(AutoEncoderTopK(8, 32, 4), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["trainer"]["dict_size"] = 64  # as if config.json came from another save
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dict_size=64 but the weights hold dict_size=32"):
        load_dictionary(tmp_path)


def test_epochs_refuses_a_batch_larger_than_the_activations():
    """It used to loop forever (the quickstart's --batch larger than the tokens collected)."""
    import torch

    from dictionary_learning.buffer import epochs

    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 10\].*got 11"):
        next(epochs(torch.zeros(10, 4), 11))
    assert next(epochs(torch.zeros(10, 4), 10)).shape == (10, 4)


def test_in_to_out_needs_two_sides(tiny_llama):
    """A single hook point (or a pair of the same point) read "in_to_out" gave x == y: a transcoder
    then learns the identity."""
    from dictionary_learning import hook

    point = hook(tiny_llama, 0, "mlp_out")
    for submodule in (point, (point, point), "layers.0.mlp_out"):
        with pytest.raises(ValueError, match="two different hook points"):
            ActivationBuffer(["some text"], tiny_llama, submodule, io="in_to_out", n_ctxs=4,
                             ctx_len=8)
    buffer = ActivationBuffer(["some text"], tiny_llama, "model.layers.0.mlp", io="in_to_out",
                              n_ctxs=4, ctx_len=8)
    assert buffer.hooks[0].io == "input" and buffer.hooks[1].io == "output"

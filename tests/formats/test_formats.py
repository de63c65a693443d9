"""Format conversion without the peers: the library-neutral form computes what each dictionary
computes (a float64 re-computation from its written formula), conversions round-trip through files
and the command line, hook points map to each library's names per family, and what a format cannot
hold is refused with a clear error. The peers' own loaders are checked in test_formats_peers.py."""

from __future__ import annotations

import pytest
import torch

from dictionary_learning.__main__ import main
from dictionary_learning.dictionary import (
    AutoEncoder,
    AutoEncoderNew,
    AutoEncoderTopK,
    BatchTopKSAE,
    GatedAutoEncoder,
    JumpReluAutoEncoder,
    MatryoshkaBatchTopKSAE,
)
from dictionary_learning.formats import detect, dictionary_from, export, load, weights_of
from dictionary_learning.formats.hooks import output_path
from dictionary_learning.formats.sparsify import hookpoint_of
from dictionary_learning.utils import load_dictionary, save_dictionary

D = 12


def randomized(dictionary, seed: int = 0):
    """The dictionary with random weights (thresholds positive; BatchTopK / Matryoshka with a
    learned one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in dictionary.named_parameters():
            values = torch.randn(parameter.shape, generator=generator) * 0.3
            parameter.copy_(values.abs() if "threshold" in name else values)
        if (isinstance(getattr(dictionary, "threshold", None), torch.Tensor)
                and dictionary.threshold.dim() == 0):
            dictionary.threshold.fill_(0.15)
    return dictionary


def matryoshka_two_groups_active():
    dictionary = MatryoshkaBatchTopKSAE(D, 36, 4, [12, 12, 12])
    dictionary.active_groups = 2  # the last group's latents never fire yet
    return dictionary


DICTIONARIES = {
    "relu": lambda: AutoEncoder(D, 36),
    "relu_wide_transcoder": lambda: AutoEncoder(D, 36, output_dim=D + 3),
    "relu_skip": lambda: AutoEncoder(D, 36, skip=True),
    "new": lambda: AutoEncoderNew(D, 36),
    "topk": lambda: AutoEncoderTopK(D, 36, 4),
    "topk_skip": lambda: AutoEncoderTopK(D, 36, 4, skip=True),
    "batchtopk": lambda: BatchTopKSAE(D, 36, 4),
    "batchtopk_transcoder": lambda: BatchTopKSAE(D, 36, 4, transcoder=True),
    "jumprelu": lambda: JumpReluAutoEncoder(D, 36),
    "jumprelu_skip": lambda: JumpReluAutoEncoder(D, 36, output_dim=D, skip=True),
    "matryoshka": matryoshka_two_groups_active,
}


def float64_reference(dictionary, x: torch.Tensor) -> torch.Tensor:
    """The dictionary's forward in float64, from its own encode / decode formulas."""
    double = type(dictionary).from_saved_state(dictionary.saved_state_dict()).double()
    for attribute in ("apply_b_dec_to_input", "active_groups"):
        if hasattr(dictionary, attribute):
            setattr(double, attribute, getattr(dictionary, attribute))
    with torch.no_grad():
        return double(x.double())


@pytest.mark.parametrize("name", sorted(DICTIONARIES))
def test_neutral_form_computes_what_the_dictionary_computes(name):
    dictionary = randomized(DICTIONARIES[name]())
    x = torch.randn(80, D, generator=torch.Generator().manual_seed(1))
    reference = float64_reference(dictionary, x)
    weights = weights_of(dictionary)
    with torch.no_grad():
        torch.testing.assert_close(weights.forward(x).double(), reference, rtol=1e-5, atol=1e-5)
        for centred in (False, True):  # moving b_dec into the encoder bias changes nothing
            if centred and weights.transcoder:
                continue
            torch.testing.assert_close(weights.with_centring(centred).forward(x).double(),
                                       reference, rtol=1e-5, atol=1e-5)
        rebuilt = dictionary_from(weights)
        torch.testing.assert_close(rebuilt(x).double(), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rebuilt.encode(x), dictionary.encode(x), rtol=1e-5, atol=1e-5)


def sae_config():
    return {"trainer": {"lm_name": "tiny-llama", "layer": 1},
            "buffer": {"hooks": [{"path": "model.layers.1", "io": "output"}]}}


def transcoder_config(layer: int = 1):
    path = f"model.layers.{layer}.mlp"
    return {"trainer": {"lm_name": "tiny-llama", "layer": layer},
            "buffer": {"hooks": [{"path": path, "io": "input"}, {"path": path, "io": "output"}]}}


@pytest.mark.parametrize("to", ["saelens", "sparsify"])
def test_command_line_export_and_import_round_trip(tmp_path, to, capsys):
    dictionary = randomized(AutoEncoderTopK(D, 36, 4, transcoder=True))
    saved = save_dictionary(dictionary, tmp_path / "ours", transcoder_config())
    if to == "saelens":
        # SAELens has no TopK transcoder
        dictionary = randomized(BatchTopKSAE(D, 36, 4, transcoder=True))
        saved = save_dictionary(dictionary, tmp_path / "ours", transcoder_config())
    main(["export", "--to", to, str(saved), str(tmp_path / "exported")])
    assert "wrote" in capsys.readouterr().out
    main(["import", str(tmp_path / "exported"), str(tmp_path / "back")])
    back, config = load_dictionary(tmp_path / "back", normalize_decoder=False)
    x = torch.randn(40, D)
    with torch.no_grad():
        torch.testing.assert_close(back(x), dictionary(x), rtol=1e-5, atol=1e-5)
    # the tiny model's adapter names both hook points by site (the saved config gave only paths)
    named = [{**hook, "name": f"layers.1.{site}"}
             for hook, site in zip(transcoder_config()["buffer"]["hooks"], ("mlp_in", "mlp_out"))]
    assert config["buffer"]["hooks"] == named
    assert config["buffer"]["submodule"] == ["layers.1.mlp_in", "layers.1.mlp_out"]
    assert (config["trainer"]["lm_name"], config["trainer"]["layer"]) == ("tiny-llama", 1)
    assert config["trainer"]["imported_from"] == to


def test_circuit_tracer_set_round_trip(tmp_path):
    dictionaries = [randomized(JumpReluAutoEncoder(D, 36, transcoder=True), seed)
                    for seed in range(3)]
    for layer, dictionary in enumerate(dictionaries):
        save_dictionary(dictionary, tmp_path / "ours" / f"tc{layer}", transcoder_config(layer))
    main(["export", "--to", "circuit-tracer", str(tmp_path / "ours"), str(tmp_path / "set")])
    text = (tmp_path / "set" / "config.yaml").read_text()
    assert "model_kind: transcoder_set" in text and "feature_input_hook: mlp.hook_in" in text
    assert detect(tmp_path / "set") == "circuit-tracer"
    main(["import", str(tmp_path / "set"), str(tmp_path / "back")])
    x = torch.randn(40, D)
    for layer, dictionary in enumerate(dictionaries):
        back, config = load_dictionary(tmp_path / "back" / f"layer_{layer}")
        with torch.no_grad():
            torch.testing.assert_close(back(x), dictionary(x), rtol=1e-6, atol=1e-6)
        assert config["trainer"]["layer"] == layer


def test_hook_names_per_family():
    # an MLP's input is the output of the norm that feeds it, named by the family adapter
    assert (output_path({"path": "transformer.h.2.mlp", "io": "input"}, "tiny-gpt2")
            == "transformer.h.2.ln_2")
    assert output_path({"path": "model.layers.1.mlp", "io": "input"}, "tiny-llama") == \
        "model.layers.1.post_attention_layernorm"
    assert output_path({"path": "model.layers.1.mlp", "io": "input"}, "tiny-gemma2") == \
        "model.layers.1.pre_feedforward_layernorm"
    # Llama and Gemma-2 disagree: no guess
    with pytest.raises(ValueError, match="hook name explicitly"):
        output_path({"path": "model.layers.1.mlp", "io": "input"}, None)
    with pytest.raises(ValueError, match="not an MLP's input"):
        output_path({"path": "model.layers.1.self_attn", "io": "input"}, "tiny-llama")
    weights = weights_of(AutoEncoderTopK(D, 36, 4), {"trainer": {"lm_name": "tiny-gpt2"},
                                                    "buffer": {"hooks": [{"path": "transformer.h.3",
                                                                          "io": "output"}]}})
    assert hookpoint_of(weights) == "h.3"  # sparsify names modules inside the base model


def test_what_a_format_cannot_hold_is_refused(tmp_path):
    topk_transcoder = save_dictionary(randomized(AutoEncoderTopK(D, 36, 4, transcoder=True)),
                                      tmp_path / "tk", transcoder_config(layer=0))
    with pytest.raises(ValueError, match="SAELens has no TopK transcoder"):
        export(topk_transcoder, tmp_path / "out", to="saelens")
    with pytest.raises(ValueError, match="cannot read"):
        export([topk_transcoder], tmp_path / "out", to="circuit-tracer")
    relu = save_dictionary(randomized(AutoEncoder(D, 36)), tmp_path / "relu", sae_config())
    with pytest.raises(ValueError, match="TopK dictionaries only"):
        export(relu, tmp_path / "out", to="sparsify")
    with pytest.raises(ValueError, match="must be a transcoder"):
        export([relu], tmp_path / "out", to="circuit-tracer")
    wrong_layer = save_dictionary(randomized(JumpReluAutoEncoder(D, 36, transcoder=True)),
                                  tmp_path / "jr", transcoder_config(layer=1))
    # the first of the set must be layer 0's
    with pytest.raises(ValueError, match="not layer 0's MLP"):
        export([wrong_layer], tmp_path / "out", to="circuit-tracer")
    with pytest.raises(ValueError, match="no equivalent"):
        weights_of(GatedAutoEncoder(D, 36))
    with pytest.raises(ValueError, match="holds none of the formats"):
        load(tmp_path)
    with pytest.raises(ValueError, match="unknown format"):
        export(relu, tmp_path / "out", to="neuronpedia")
    assert not (tmp_path / "out").exists()  # nothing half-written by the refused exports


def test_transcoders_trained_from_one_pass_export_as_a_set(tmp_path, tiny_llama):
    """Every layer's MLP transcoder trained from one buffer over all layers (each trainer's saved
    config names its own entry's hook points among the buffer's) exports as a circuit-tracer set
    that loads back unchanged."""
    from dictionary_learning import ActivationBuffer, hook
    from dictionary_learning.models import n_layers
    from dictionary_learning.trainers import BatchTopKTrainer
    from dictionary_learning.training import trainSAE

    from ..helpers import random_texts

    layers = n_layers(tiny_llama)
    points = {f"mlp_{i}": (hook(tiny_llama, i, "mlp_in"), hook(tiny_llama, i, "mlp_out"))
              for i in range(layers)}
    buffer = ActivationBuffer(iter(random_texts(60, seed=3)), tiny_llama, points, n_ctxs=8,
                              ctx_len=32, refresh_batch_size=4, out_batch_size=32)
    configs = [dict(trainer=BatchTopKTrainer, activation_dim=64, dict_size=128, k=4,
                    transcoder=True, steps=6, warmup_steps=1, threshold_start_step=1, layer=i,
                    lm_name="tiny-llama", submodule_name=f"mlp_{i}",
                    seed=i) for i in range(layers)]
    trainSAE(buffer, configs, 6, save_dir=tmp_path / "runs")
    exported = export(tmp_path / "runs", tmp_path / "set", to="circuit-tracer")
    loaded = load(exported)
    assert len(loaded) == layers
    x = torch.randn(20, 64)
    for layer, (dictionary, config) in enumerate(loaded):
        saved, saved_config = load_dictionary(tmp_path / "runs" / f"trainer_{layer}")
        assert saved_config["trainer"]["layer"] == layer
        with torch.no_grad():
            torch.testing.assert_close(dictionary(x), saved(x), rtol=1e-5, atol=1e-5)
        path = f"model.layers.{layer}.mlp"
        assert config["buffer"]["hooks"] == [{"path": path, "io": "input",
                                              "name": f"layers.{layer}.mlp_in"},
                                             {"path": path, "io": "output",
                                              "name": f"layers.{layer}.mlp_out"}]
        assert config["trainer"]["lm_name"] == "tiny-llama"

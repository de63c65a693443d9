"""`python -m dictionary_learning circuit`: saved dictionaries placed at the hook points their
config.json names (an SAE and a transcoder), prompt pairs from a JSONL file in the paper's format,
and a report folder whose curve ends are exact."""

import json

import pytest

from dictionary_learning.__main__ import main
from dictionary_learning.circuits import PromptPair, save_prompt_pairs
from dictionary_learning.dictionary import AutoEncoder, AutoEncoderTopK
from dictionary_learning.utils import save_dictionary

from ..circuits.test_nodes import randomized


def test_circuit_command_writes_its_report(tmp_path, tiny_llama):
    d = tiny_llama.config.hidden_size
    sae = save_dictionary(randomized(AutoEncoder(d, 32), 1).float(), tmp_path / "resid_0", {
        "trainer": {"lm_name": "tiny-llama", "layer": 0},
        "buffer": {"hooks": [{"path": "model.layers.0", "io": "output",
                              "name": "layers.0.resid"}]}})
    mlp = "model.layers.1.mlp"
    transcoder = save_dictionary(
        randomized(AutoEncoderTopK(d, 24, 4, transcoder=True), 2, scale=0.1).float(),
        tmp_path / "mlp_1", {"trainer": {"lm_name": "tiny-llama", "layer": 1},
                             "buffer": {"hooks": [{"path": mlp, "io": "input"},
                                                  {"path": mlp, "io": "output",
                                                   "name": "layers.1.mlp_out"}]}})
    # the tiny models' byte tokenizer: one character, one token
    pairs = [PromptPair(f"ab{c}", f"ac{c}", "x", "y") for c in "defg"]
    save_prompt_pairs(pairs, tmp_path / "pairs.jsonl")
    out = tmp_path / "report"
    main(["circuit", str(sae), str(transcoder), "--prompts", str(tmp_path / "pairs.jsonl"),
          "--steps", "2", "--thresholds", "0,0.5,100", "--label-texts", "3",
          "--dashboards", "layers.0.resid=dash/index.html", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["sites"] == ["layers.0.resid", "layers.1.mlp_out"]
    assert results["pairs"] == 4 and results["model"] == "tiny-llama"
    everything, _, nothing = results["curve"]
    assert everything["nodes"] + everything["error_nodes"] > 0
    assert everything["faithfulness"] == pytest.approx(1, abs=1e-4)
    assert nothing["nodes"] == 0 and nothing["faithfulness"] == pytest.approx(0, abs=1e-4)
    assert (out / "circuit.png").read_bytes().startswith(b"\x89PNG")
    assert "dash/index.html#feature-" in (out / "circuit.svg").read_text()
    assert json.loads((out / "circuit.json").read_text())["metadata"]["prompt_tokens"]


def test_bad_input_is_refused(tmp_path, tiny_llama):
    """A dictionary whose config.json places it nowhere; thresholds that are not numbers."""
    d = tiny_llama.config.hidden_size
    bare = save_dictionary(AutoEncoder(d, 8), tmp_path / "bare",
                           {"trainer": {"lm_name": "tiny-llama"}})
    with pytest.raises(ValueError, match="names 0 hook points; an SAE needs 1"):
        main(["circuit", str(bare), "--out", str(tmp_path / "report")])
    with pytest.raises(ValueError, match="thresholds must be comma-separated numbers"):
        main(["circuit", str(bare), "--thresholds", "0.1,half", "--out", str(tmp_path / "r")])


def test_circuit_command_on_an_scae_suite(tmp_path):
    """--suite: the circuit of a saved SCAE suite's replacement model, drawn with
    its exact connection edges, their agreement with the attribution edges in results.json."""
    from dictionary_learning import load_model
    from dictionary_learning.scae import all_connections

    from ..helpers import make_suite

    model = load_model("tiny-llama", attn_implementation="eager")
    suite = make_suite(model, n_layer=2)
    suite.connections = all_connections(suite, model)
    suite.model_name = "tiny-llama"
    folder = suite.save(tmp_path / "suite")
    pairs = [PromptPair(f"ab{c}", f"ac{c}", "x", "y") for c in "defg"]
    save_prompt_pairs(pairs, tmp_path / "pairs.jsonl")
    out = tmp_path / "report"
    main(["circuit", "--suite", str(folder), "--prompts", str(tmp_path / "pairs.jsonl"),
          "--method", "attribution", "--thresholds=-1,100", "--label-texts", "0",
          "--graph-threshold", "0.01", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["sites"] == suite.names and results["suite"] == str(folder)
    everything, nothing = results["curve"]
    assert everything["nodes"] == 4 * 96 and nothing["nodes"] == 0
    assert everything["faithfulness"] == pytest.approx(1, abs=1e-4)
    pairs_seen = {(a["upstream"], a["downstream"]) for a in results["edge_agreement"]}
    assert ("attn_0", "mlp_1") in pairs_seen and len(pairs_seen) == 6
    assert all(a["captured"] == pytest.approx(1) for a in results["edge_agreement"])
    assert results["graph"]["links"] > 0
    with pytest.raises(ValueError, match="one of the two"):
        main(["circuit", "--out", str(tmp_path / "r")])

"""Exports load in the peers' own packages with identical outputs, and the peers' own saves load
here with identical outputs: SAELens, sparsify and circuit-tracer, each in the venv `bash
bench/setup_peers.sh sae-lens eai-sparsify circuit-tracer` builds (a test skips when its venv is
absent). Inputs and outputs cross between the venvs as safetensors files; tests/peer_formats.py is
the peer side."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dictionary_learning.dictionary import (
    AutoEncoder,
    AutoEncoderTopK,
    BatchTopKSAE,
    JumpReluAutoEncoder,
    MatryoshkaBatchTopKSAE,
)
from dictionary_learning.formats import export, load
from dictionary_learning.utils import save_dictionary

from ..helpers import missing_peer
from .test_formats import randomized

pytestmark = pytest.mark.peers

PEER_SCRIPT = Path(__file__).parents[1] / "peer_formats.py"
VENVS = {"saelens": "sae-lens", "sparsify": "eai-sparsify", "circuit-tracer": "circuit-tracer"}
D = 16


def peer_python(peer: str) -> Path:
    from bench.peers import peers_dir

    python = peers_dir() / VENVS[peer] / "bin" / "python"
    if not python.exists():
        missing_peer(VENVS[peer])
    return python


class PeerRun:
    """Jobs for one peer, queued while a module fixture prepares its folders, then run in one peer
    process."""

    def __init__(self, peer: str, root: Path):
        self.peer, self.root, self.jobs = peer, root, []

    def add(self, name: str, action: str, inputs: dict[str, torch.Tensor],
            folder: Path | None = None, kind: str | None = None) -> Path:
        folder = folder or self.root / name
        io_path = self.root / f"{name}.io.safetensors"
        save_file(inputs, str(io_path))
        self.jobs.append({"peer": self.peer, "action": action, "folder": str(folder),
                          "io": str(io_path), "kind": kind})
        return folder

    def run(self) -> None:
        jobs = self.root / "jobs.json"
        jobs.write_text(json.dumps(self.jobs))
        result = subprocess.run([str(peer_python(self.peer)), str(PEER_SCRIPT), str(jobs)],
                                capture_output=True, text=True, timeout=900,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.strip().splitlines()[-1]) == {"ok": True,
                                                                      "jobs": len(self.jobs)}

    def outputs(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / f"{name}.io.out.safetensors"))


def close(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    difference = (ours.float() - theirs.float()).abs().max().item()
    print(f"FORMAT-DIFF {name}: max |ours - peer| = {difference:.3g}")
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-5)
    return difference


def sae_hooks() -> dict:
    return {"trainer": {"lm_name": "tiny-llama", "layer": 1},
            "buffer": {"hooks": [{"path": "model.layers.1", "io": "output"}]}}


def transcoder_hooks(layer: int = 1) -> dict:
    path = f"model.layers.{layer}.mlp"
    return {"trainer": {"lm_name": "tiny-llama", "layer": layer},
            "buffer": {"hooks": [{"path": path, "io": "input"}, {"path": path, "io": "output"}]}}


def with_b_dec_input(dictionary):
    dictionary.apply_b_dec_to_input = True
    return dictionary


OURS_TO_SAELENS = {  # name -> (dictionary, architecture SAELens must read it as)
    "relu_sae": (lambda: AutoEncoder(D, 48), "standard"),
    "topk_sae": (lambda: AutoEncoderTopK(D, 48, 5), "topk"),
    "jumprelu_sae": (lambda: JumpReluAutoEncoder(D, 48), "jumprelu"),
    "jumprelu_sae_centred": (lambda: with_b_dec_input(JumpReluAutoEncoder(D, 48)), "jumprelu"),
    "batchtopk_sae": (lambda: BatchTopKSAE(D, 48, 5), "jumprelu"),
    "matryoshka_sae": (lambda: MatryoshkaBatchTopKSAE(D, 48, 5, [16, 32]), "jumprelu"),
    "relu_transcoder": (lambda: AutoEncoder(D, 48, output_dim=D + 4), "transcoder"),
    "relu_skip_transcoder": (lambda: AutoEncoder(D, 48, skip=True), "skip_transcoder"),
    "jumprelu_skip_transcoder": (lambda: JumpReluAutoEncoder(D, 48, skip=True),
                                 "jumprelu_skip_transcoder"),
    "batchtopk_transcoder": (lambda: BatchTopKSAE(D, 48, 5, transcoder=True),
                             "jumprelu_transcoder"),
}


SAELENS_KINDS = ["standard", "topk", "jumprelu", "transcoder", "skip_transcoder",
                 "jumprelu_transcoder",
                 "jumprelu_skip_transcoder",
                 # trained by SAELens (decoder rows of any norm; TopK rescaled by them, BatchTopK
                 # with its threshold) and saved by its save_inference_model, as a user would
                 "topk_trained", "batchtopk_trained"]
SPARSIFY_KINDS = ["sae", "transcoder", "skip_transcoder"]
CIRCUIT_TRACER_KINDS = ["relu", "jumprelu", "relu_skip"]
OURS_TO_SPARSIFY = {
    "topk_sae": (lambda: AutoEncoderTopK(D, 48, 5), sae_hooks, "layers.1"),
    "topk_transcoder": (lambda: AutoEncoderTopK(D, 48, 5, transcoder=True), transcoder_hooks,
                        "layers.1.mlp"),
    "topk_skip_transcoder": (lambda: AutoEncoderTopK(D, 48, 5, skip=True), transcoder_hooks,
                             "layers.1.mlp"),
}
OURS_TO_CIRCUIT_TRACER = {
    "batchtopk": lambda: BatchTopKSAE(D, 48, 5, transcoder=True),
    "jumprelu_skip": lambda: JumpReluAutoEncoder(D, 48, skip=True),
    "relu": lambda: AutoEncoder(D, 48, transcoder=True),
}


def inputs_for(seed: int, layers: int | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if layers is None:
        return {"x": torch.randn(64, D, generator=generator)}
    return {f"x_{layer}": torch.randn(64, D, generator=generator) for layer in range(layers)}


@pytest.fixture(scope="module")
def saelens(tmp_path_factory):
    run, ours = PeerRun("saelens", tmp_path_factory.mktemp("saelens")), {}
    peer_python("saelens")
    for seed, (name, (make, _)) in enumerate(sorted(OURS_TO_SAELENS.items())):
        dictionary = randomized(make(), seed)
        saved = save_dictionary(dictionary, run.root / f"ours_{name}",
                                transcoder_hooks() if dictionary.transcoder else sae_hooks())
        ours[name] = dictionary
        run.add(f"export_{name}", "load", inputs_for(seed),
                export(saved, run.root / f"export_{name}", to="saelens"))
    for seed, kind in enumerate(SAELENS_KINDS):
        run.add(f"import_{kind}", "write", inputs_for(100 + seed), kind=kind)
    run.run()
    return run, ours


@pytest.mark.parametrize("name", sorted(OURS_TO_SAELENS))
def test_export_loads_in_saelens(saelens, name):
    run, ours = saelens
    x, theirs = inputs_for(sorted(OURS_TO_SAELENS).index(name))["x"], run.outputs(f"export_{name}")
    assert bytes(theirs["architecture"].tolist()).decode() == OURS_TO_SAELENS[name][1]
    with torch.no_grad():
        close(f"saelens export {name} features", ours[name].encode(x), theirs["features"])
        close(f"saelens export {name} output", ours[name](x), theirs["out"])


@pytest.mark.parametrize("kind", SAELENS_KINDS)
def test_saelens_saves_load_here(saelens, kind):
    run, _ = saelens
    x, theirs = inputs_for(100 + SAELENS_KINDS.index(kind))["x"], run.outputs(f"import_{kind}")
    dictionary, config = load(run.root / f"import_{kind}")
    with torch.no_grad():
        close(f"saelens import {kind} features", dictionary.encode(x), theirs["features"])
        close(f"saelens import {kind} output", dictionary(x), theirs["out"])
    # the norm feeding the MLP is the MLP's input, named by its site
    hooks = config["buffer"]["hooks"]
    assert hooks[0] == {"path": "model.layers.1.mlp", "io": "input", "name": "layers.1.mlp_in"}
    if "transcoder" in kind:
        assert hooks[1] == {"path": "model.layers.1.mlp", "io": "output",
                            "name": "layers.1.mlp_out"}


@pytest.fixture(scope="module")
def sparsify(tmp_path_factory):
    run, ours = PeerRun("sparsify", tmp_path_factory.mktemp("sparsify")), {}
    peer_python("sparsify")
    for seed, (name, (make, hooks, hookpoint)) in enumerate(sorted(OURS_TO_SPARSIFY.items())):
        dictionary = randomized(make(), seed)
        saved = save_dictionary(dictionary, run.root / f"ours_{name}", hooks())
        folder = export(saved, run.root / f"export_{name}", to="sparsify")
        assert folder == run.root / f"export_{name}" / hookpoint
        ours[name] = dictionary
        run.add(f"export_{name}", "load", inputs_for(seed), folder)
    for seed, kind in enumerate(SPARSIFY_KINDS):
        run.add(f"import_{kind}", "write", inputs_for(100 + seed), kind=kind)
    run.run()
    return run, ours


@pytest.mark.parametrize("name", sorted(OURS_TO_SPARSIFY))
def test_export_loads_in_sparsify(sparsify, name):
    run, ours = sparsify
    x, theirs = inputs_for(sorted(OURS_TO_SPARSIFY).index(name))["x"], run.outputs(f"export_{name}")
    with torch.no_grad():
        close(f"sparsify export {name} features", ours[name].encode(x), theirs["features"])
        close(f"sparsify export {name} output", ours[name](x), theirs["out"])


@pytest.mark.parametrize("kind", SPARSIFY_KINDS)
def test_sparsify_saves_load_here(sparsify, kind):
    run, _ = sparsify
    x, theirs = inputs_for(100 + SPARSIFY_KINDS.index(kind))["x"], run.outputs(f"import_{kind}")
    # the run's only hookpoint
    dictionary, config = load(run.root / f"import_{kind}", model_name="tiny-llama")
    with torch.no_grad():
        close(f"sparsify import {kind} features", dictionary.encode(x), theirs["features"])
        close(f"sparsify import {kind} output", dictionary(x), theirs["out"])
    io = ["input", "output"] if kind != "sae" else ["output"]
    assert [h["io"] for h in config["buffer"]["hooks"]] == io
    assert {h["path"] for h in config["buffer"]["hooks"]} == {"model.layers.1.mlp"}


@pytest.fixture(scope="module")
def circuit_tracer(tmp_path_factory):
    run, ours = PeerRun("circuit-tracer", tmp_path_factory.mktemp("circuit_tracer")), {}
    peer_python("circuit-tracer")
    for seed, (name, make) in enumerate(sorted(OURS_TO_CIRCUIT_TRACER.items())):
        ours[name] = [randomized(make(), 10 * seed + layer) for layer in range(2)]
        for layer, dictionary in enumerate(ours[name]):
            save_dictionary(dictionary, run.root / f"ours_{name}" / f"layer{layer}",
                            transcoder_hooks(layer))
        folder = export(run.root / f"ours_{name}", run.root / f"export_{name}", to="circuit-tracer")
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "layer_0.safetensors",
                                                             "layer_1.safetensors"]
        run.add(f"export_{name}", "load", inputs_for(seed, layers=2), folder)
    for seed, kind in enumerate(CIRCUIT_TRACER_KINDS):
        run.add(f"import_{kind}", "write", inputs_for(100 + seed, layers=3), kind=kind)
    run.run()
    return run, ours


@pytest.mark.parametrize("name", sorted(OURS_TO_CIRCUIT_TRACER))
def test_export_loads_in_circuit_tracer(circuit_tracer, name):
    run, ours = circuit_tracer
    inputs, theirs = (inputs_for(sorted(OURS_TO_CIRCUIT_TRACER).index(name), layers=2),
                      run.outputs(f"export_{name}"))
    with torch.no_grad():
        for layer, dictionary in enumerate(ours[name]):
            x = inputs[f"x_{layer}"]
            close(f"circuit-tracer export {name} layer {layer} features", dictionary.encode(x),
                  theirs[f"features_{layer}"])
            close(f"circuit-tracer export {name} layer {layer} output", dictionary(x),
                  theirs[f"out_{layer}"])


@pytest.mark.parametrize("kind", CIRCUIT_TRACER_KINDS)
def test_circuit_tracer_saves_load_here(circuit_tracer, kind):
    run, _ = circuit_tracer
    inputs, theirs = (inputs_for(100 + CIRCUIT_TRACER_KINDS.index(kind), layers=3),
                      run.outputs(f"import_{kind}"))
    loaded = load(run.root / f"import_{kind}")
    assert len(loaded) == 3
    with torch.no_grad():
        for layer, (dictionary, config) in enumerate(loaded):
            x = inputs[f"x_{layer}"]
            close(f"circuit-tracer import {kind} layer {layer} features", dictionary.encode(x),
                  theirs[f"features_{layer}"])
            close(f"circuit-tracer import {kind} layer {layer} output", dictionary(x),
                  theirs[f"out_{layer}"])
            assert config["buffer"]["hooks"][1] == {"path": f"model.layers.{layer}.mlp",
                                                    "io": "output",
                                                    "name": f"layers.{layer}.mlp_out"}

"""Run inside a peer's venv (built by bench/setup_peers.sh) by tests/formats/test_formats_peers.py;
imports only the peer.

    python peer_formats.py JOBS.json

JOBS.json lists jobs `{"action", "peer", "folder", "io", "kind"}`, all run in this one process (the
peers take seconds to import):
    load   the peer's own loader reads `folder`; its features and outputs on the io file's "x" are
           written to `io` with .out.safetensors in place of .safetensors
    write  the peer builds a random dictionary of `kind`, saves it at `folder` with its own
           writer, and writes its outputs likewise

Peers: saelens, sparsify, circuit-tracer (whose folder is a transcoder set, and whose io file holds
"x_{layer}").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            values = torch.randn(parameter.shape, generator=generator) * 0.3
            if "threshold" in name:
                values = values.abs()
            parameter.copy_(values.to(parameter.dtype))


# SAELens ------------------------------------------------------------------------------------------
def saelens_outputs(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.eval()
    with torch.no_grad():
        return {"features": sae.encode(x), "out": sae(x)}


def saelens_load(folder: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder, device="cpu")
    return {**saelens_outputs(sae, x),
            "architecture": torch.tensor(list(sae.cfg.architecture().encode()))}


def saelens_write(folder: str, kind: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from sae_lens import SAE

    if kind.endswith("_trained"):
        return saelens_write_trained(folder, kind, x)
    d_in, d_sae = x.shape[1], 48
    config = {"architecture": kind, "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
              "device": "cpu", "apply_b_dec_to_input": "transcoder" not in kind,
              "normalize_activations": "none", "metadata": {"model_name": "tiny-llama",
                           "hook_name": "model.layers.1.post_attention_layernorm",
                           "hook_name_out": "model.layers.1.mlp"}}
    if kind == "topk":
        config["k"] = 5
    if "transcoder" in kind:
        config["d_out"] = d_in
    sae = SAE.from_dict(config)
    randomize(sae)
    sae.save_model(folder)
    return saelens_outputs(sae, x)


def saelens_write_trained(folder: str, kind: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A training SAE with decoder rows of random norms, saved for inference by SAELens (which
    folds the norms for TopK's rescale_acts_by_decoder_norm, and saves BatchTopK as JumpReLU with
    its running threshold); the outputs are those of the saved folder as SAELens loads it."""
    from sae_lens import (
        SAE,
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    common = dict(d_in=x.shape[1], d_sae=48, k=5, dtype="float32", device="cpu")
    if kind == "topk_trained":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(rescale_acts_by_decoder_norm=True, **common))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    randomize(sae)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1, generator=torch.Generator()
                                  .manual_seed(1)) * 2 + 0.2)
        if kind == "batchtopk_trained":
            sae.topk_threshold.fill_(0.2)
    sae.save_inference_model(folder)
    config = json.loads((Path(folder) / "cfg.json").read_text())
    config["metadata"].update({"model_name": "tiny-llama",
                               "hook_name": "model.layers.1.post_attention_layernorm"})
    (Path(folder) / "cfg.json").write_text(json.dumps(config))
    return saelens_outputs(SAE.load_from_disk(folder, device="cpu"), x)


# sparsify -----------------------------------------------------------------------------------------
def sparsify_outputs(coder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        features = torch.zeros(x.shape[0], coder.num_latents).scatter_(-1, top_indices, top_acts)
        return {"features": features, "out": coder(x).sae_out}


def sparsify_load(folder: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from sparsify import SparseCoder

    return sparsify_outputs(SparseCoder.load_from_disk(folder, device="cpu"), x)


def sparsify_write(folder: str, kind: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from sparsify import SparseCoder, SparseCoderConfig

    config = SparseCoderConfig(num_latents=48, k=5,
                               transcode=kind in ("transcoder", "skip_transcoder"),
                               skip_connection=kind == "skip_transcoder")
    coder = SparseCoder(x.shape[1], config, device="cpu", dtype=torch.float32)
    randomize(coder)
    coder.save_to_disk(Path(folder) / "layers.1.mlp")
    return sparsify_outputs(coder, x)


# circuit-tracer -----------------------------------------------------------------------------------
def circuit_tracer_outputs(transcoders, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    results = {}
    with torch.no_grad():
        for layer, transcoder in enumerate(transcoders):
            x = inputs[f"x_{layer}"]
            features = transcoder.encode(x)
            results[f"features_{layer}"] = features
            results[f"out_{layer}"] = transcoder.decode(features, x)
    return results


def circuit_tracer_load(folder: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    loaded = load_transcoders_from_cache(str(Path(folder).resolve()), dtype=torch.float32,
                                         device=torch.device("cpu"), lazy_encoder=False,
                                         lazy_decoder=False)
    transcoders = loaded[0] if isinstance(loaded, tuple) else loaded
    return circuit_tracer_outputs(transcoders, inputs)


def circuit_tracer_write(folder: str, kind: str,
                         inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch.nn.functional as F
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import (
        SingleLayerTranscoder,
        TranscoderSet,
    )

    d_model, layers = inputs["x_0"].shape[1], len(inputs)
    transcoders = {}
    for layer in range(layers):
        activation = JumpReLU(torch.zeros(48), 0.1) if kind.startswith("jumprelu") else F.relu
        transcoder = SingleLayerTranscoder(d_model, 48, activation, layer,
                                           skip_connection=kind.endswith("skip"),
                                           device=torch.device("cpu"), dtype=torch.float32)
        randomize(transcoder, seed=layer)
        transcoders[layer] = transcoder
    transcoder_set = TranscoderSet(transcoders, "mlp.hook_in", "mlp.hook_out")
    transcoder_set.to_safetensors(folder)
    (Path(folder) / "config.yaml").write_text(
        "model_kind: transcoder_set\nmodel_name: HuggingFaceTB/SmolLM2-135M-Instruct\n"
        "feature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n")
    return circuit_tracer_outputs(transcoder_set, inputs)


def main() -> None:
    torch.set_grad_enabled(False)
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        peer, action, folder, io_path, kind = (job["peer"], job["action"], job["folder"], job["io"],
                                               job.get("kind"))
        inputs = load_file(io_path)
        function = globals()[f"{peer.replace('-', '_')}_{action}"]
        if peer != "circuit-tracer":
            inputs = inputs["x"]
        results = function(folder, inputs) if action == "load" else function(folder, kind, inputs)
        save_file({name: t.contiguous() for name, t in results.items()},
                  io_path.replace(".safetensors", ".out.safetensors"))
    print(json.dumps({"ok": True, "jobs": len(jobs)}))


if __name__ == "__main__":
    main()

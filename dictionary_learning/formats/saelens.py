"""SAELens' folder format (v6): `cfg.json` + `sae_weights.safetensors`, as `SAE.save_model` writes
and `SAE.load_from_disk` reads. Weights: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec,
threshold [d_sae] (JumpReLU), W_skip [d_out, d_in] (skip transcoders). Hooks are Hugging Face module
paths (SAELens hooks module outputs; `metadata.model_class_name: AutoModelForCausalLM`),
`metadata.hook_name_out` for a transcoder's output.

Architectures: SAEs `standard` (ReLU), `topk`, `jumprelu` (also BatchTopK / Matryoshka through their
learned threshold, as SAELens itself saves them); transcoders `transcoder`, `skip_transcoder`,
`jumprelu_transcoder`, `jumprelu_skip_transcoder`. SAELens has no TopK transcoder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_folder, atomic_write, atomic_write_json, read_json, read_safetensors
from .hooks import HUB_NAMES, input_hook, output_path
from .weights import Weights

CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
# SAELens reads a config as v6 (nested `metadata`, `architecture`) only when
# metadata.sae_lens_version >= 6.0.0; older ones go through its pre-6 migration. This is the version
# of the format written, not of an installed SAELens.
FORMAT_VERSION = "6.0.0"
ARCHITECTURES = {  # (transcoder, skip, activation) -> architecture
    (False, False, "relu"): "standard", (False, False, "topk"): "topk",
    (False, False, "jumprelu"): "jumprelu", (True, False, "relu"): "transcoder",
    (True, True, "relu"): "skip_transcoder", (True, False, "jumprelu"): "jumprelu_transcoder",
    (True, True, "jumprelu"): "jumprelu_skip_transcoder",
}
ACTIVATION_OF = {architecture: key[2] for key, architecture in ARCHITECTURES.items()}
# saved for inference as jumprelu
ACTIVATION_OF.update({"batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"})


def hf_model_name(model_name: str | None) -> str | None:
    return HUB_NAMES.get(model_name, model_name) if model_name else model_name


def export_saelens(weights: Weights, out: str | Path, hook_name: str | None = None,
                   hook_name_out: str | None = None) -> Path:
    """Write `weights` as a SAELens folder at `out` (replaced whole). hook_name / hook_name_out: the
    Hugging Face module paths SAELens hooks (default: from the dictionary's hook points; an MLP's
    input becomes the output of the norm that feeds it)."""
    from safetensors.torch import save_file

    transcoder = weights.transcoder or weights.d_in != weights.d_out
    key = (transcoder, weights.W_skip is not None, weights.activation)
    if key not in ARCHITECTURES:
        kind = "TopK transcoder" if weights.activation == "topk" else "SAE with a skip connection"
        raise ValueError(f"SAELens has no {kind} architecture (it has "
                         f"{sorted(set(ARCHITECTURES.values()))}); train a BatchTopK or JumpReLU "
                         "transcoder to export to SAELens")
    if transcoder and weights.centred:
        raise ValueError("SAELens transcoders cannot subtract b_dec from their input")
    state = {"W_enc": weights.W_enc.T, "b_enc": weights.b_enc, "W_dec": weights.W_dec,
             "b_dec": weights.b_dec}
    if weights.threshold is not None and weights.activation == "jumprelu":
        state["threshold"] = weights.threshold
    if weights.W_skip is not None:
        state["W_skip"] = weights.W_skip
    metadata: dict[str, Any] = {"sae_lens_version": FORMAT_VERSION,
                                "sae_lens_training_version": None,
                                "model_name": hf_model_name(weights.model_name),
                                "model_class_name": "AutoModelForCausalLM", "hook_head_index": None,
                                "prepend_bos": True, "exported_by": "dictionary_learning"}
    if weights.model_name and hf_model_name(weights.model_name) != weights.model_name:
        # this toolkit's offline name, which the import restores
        metadata["lm_name"] = weights.model_name
    if weights.layer is not None:
        metadata["layer"] = weights.layer
    if weights.hooks or hook_name:
        metadata["hook_name"] = hook_name or output_path(weights.hooks[0], weights.model_name)
    if transcoder and (len(weights.hooks) == 2 or hook_name_out):
        metadata["hook_name_out"] = hook_name_out or output_path(weights.hooks[1],
                                                                 weights.model_name)
    config: dict[str, Any] = {"architecture": ARCHITECTURES[key], "d_in": weights.d_in,
                              "d_sae": weights.d_sae, "dtype": "float32", "device": "cpu",
                              "apply_b_dec_to_input": weights.centred,
                              "normalize_activations": "none", "reshape_activations": "none",
                              "metadata": metadata}
    if weights.activation == "topk":
        config.update(k=weights.k, rescale_acts_by_decoder_norm=False)
    if transcoder:
        config["d_out"] = weights.d_out
    state = {name: tensor.float().contiguous() for name, tensor in state.items()}
    with atomic_folder(out, owned=lambda name: name in (CONFIG, WEIGHTS)) as staging:
        atomic_write(staging / WEIGHTS, lambda tmp: save_file(state, tmp))
        atomic_write_json(staging / CONFIG, config)
    return Path(out)


def _v6_config(config: dict[str, Any]) -> dict[str, Any]:
    """A SAELens config in v6 form: older flat ones (`hook_point`, `activation_fn_str`,
    `activation_fn_kwargs.k`) are read as SAELens' own migration reads them."""
    version = (config.get("sae_lens_version")
               or (config.get("metadata") or {}).get("sae_lens_version"))
    if version and int(str(version).split(".")[0]) >= 6:
        return config
    config = dict(config)
    metadata = dict(config.get("metadata") or {})
    for old, new in (("hook_point", "hook_name"), ("hook_name", "hook_name"),
                     ("model_name", "model_name"), ("hook_name_out", "hook_name_out"),
                     ("layer", "layer")):
        if old in config:
            metadata.setdefault(new, config[old])
    config["metadata"] = metadata
    activation = config.get("activation_fn_str", config.get("activation_fn", "relu"))
    config.setdefault("apply_b_dec_to_input", True)
    if "architecture" not in config:
        config["architecture"] = "topk" if activation == "topk" else "standard"
    if config["architecture"] == "topk" and "k" not in config:
        config["k"] = (config.get("activation_fn_kwargs") or {}).get("k")
    return config


def _unit_rows(matrix: torch.Tensor | None) -> bool:
    return matrix is not None and bool(torch.allclose(matrix.float().norm(dim=-1),
                                                      torch.ones(()), atol=1e-4))


def load_saelens(folder: str | Path) -> Weights:
    """The library-neutral weights of a SAELens folder (`cfg.json` + `sae_weights.safetensors`)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ValueError(f"expected a SAELens folder with {CONFIG} and {WEIGHTS}, got "
                         f"{str(folder)!r}")
    config = _v6_config(read_json(folder / CONFIG, expect=dict))
    architecture = config.get("architecture")
    if architecture not in ACTIVATION_OF:
        raise ValueError(f"{str(folder)!r}: SAELens architecture {architecture!r} is not "
                         f"convertible; supported: {sorted(ACTIVATION_OF)}")
    if config.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{str(folder)!r}: "
                         f"normalize_activations={config['normalize_activations']!r} rescales "
                         "inputs at run time, which the other formats cannot express; fold it into "
                         "the weights first")
    if (config.get("reshape_activations", "none") not in ("none", None)
            or config.get("finetuning_scaling_factor")):
        raise ValueError(f"{str(folder)!r}: reshape_activations / finetuning_scaling_factor are "
                         "not supported")
    state = {name: tensor.float() for name, tensor in read_safetensors(folder / WEIGHTS).items()}
    # SAELens' save_inference_model folds the decoder norms into the weights (unit-norm rows) and
    # keeps the flag, which is then a no-op; with other norms it changes which latents are chosen
    if (architecture == "topk" and config.get("rescale_acts_by_decoder_norm")
            and not _unit_rows(state.get("W_dec"))):
        raise ValueError(f"{str(folder)!r}: rescale_acts_by_decoder_norm=True selects latents by "
                         "decoder-scaled pre-activations, which this toolkit's TopK does not, and "
                         "W_dec's rows are not unit-norm; save with SAELens' save_inference_model "
                         "(which folds the norms) first")
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise ValueError(f"{str(folder)!r}: a scaling_factor other than 1 is not supported")
    if "threshold" not in state and "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec") if name not in state]
    if missing:
        raise ValueError(f"{str(folder / WEIGHTS)!r} lacks {missing}")
    uses = ({"W_enc", "b_enc", "W_dec", "b_dec"}
            | ({"threshold"} if ACTIVATION_OF[architecture] == "jumprelu" else set())
            | ({"W_skip"} if "skip" in architecture else set()))
    unused = sorted(set(state) - uses)
    if unused:  # a tensor the architecture would silently drop: the label and the weights disagree
        raise ValueError(f"{str(folder / WEIGHTS)!r} holds {unused}, which a {architecture!r} SAE "
                         f"(as {CONFIG} says) does not use: the architecture and the weights "
                         "disagree")
    if (config.get("d_in"), config.get("d_sae")) != tuple(state["W_enc"].shape):
        raise ValueError(f"{str(folder)!r}: W_enc has shape {tuple(state['W_enc'].shape)}, but "
                         f"{CONFIG} says d_in={config.get('d_in')}, d_sae={config.get('d_sae')}")
    d_out = config.get("d_out", config.get("d_in"))
    if (tuple(state["W_dec"].shape) != (config["d_sae"], d_out)
            or tuple(state["b_dec"].shape) != (d_out,)):
        raise ValueError(f"{str(folder)!r}: W_dec {tuple(state['W_dec'].shape)} and b_dec "
                         f"{tuple(state['b_dec'].shape)} do not match {CONFIG}'s "
                         f"d_sae={config['d_sae']}, d_out={d_out}")
    metadata = config.get("metadata") or {}
    transcoder = "transcoder" in architecture
    model_name = metadata.get("model_name")
    if metadata.get("exported_by") == "dictionary_learning" and metadata.get("lm_name"):
        # the offline name this toolkit exported it from (smollm2-135m)
        model_name = metadata["lm_name"]
    hook_name, layer = metadata.get("hook_name"), metadata.get("layer")
    hooks = [input_hook(hook_name, model_name)] if hook_name else []
    if hooks and transcoder and metadata.get("hook_name_out"):
        hooks.append({"path": metadata["hook_name_out"], "io": "output"})
    tl_name = re.fullmatch(r"blocks\.(\d+)\..+", hook_name or "")
    # a TransformerLens hook name (no Hugging Face module path): the layer is kept, the hooks are
    # not
    if tl_name:
        hooks, layer = [], int(tl_name.group(1)) if layer is None else layer
    activation = ACTIVATION_OF[architecture]
    return Weights(W_enc=state["W_enc"].T.contiguous(), b_enc=state["b_enc"], W_dec=state["W_dec"],
                   b_dec=state["b_dec"], activation=activation, k=config.get("k"),
                   threshold=state.get("threshold") if activation == "jumprelu" else None,
                   W_skip=state.get("W_skip"),
                   centred=bool(config.get("apply_b_dec_to_input")) and not transcoder,
                   transcoder=transcoder, model_name=model_name, layer=layer, hooks=hooks)

"""circuit-tracer's per-layer transcoder set: `config.yaml` (`model_kind: transcoder_set`,
`model_name`, `feature_input_hook: mlp.hook_in`, `feature_output_hook: mlp.hook_out`) and one
`layer_{i}.safetensors` per layer 0..n-1 with W_enc [d_tc, d_model], b_enc, W_dec [d_tc, d_model],
b_dec [d_model], optional W_skip [d_model, d_model] (out = ... + x @ W_skip.T) and
`activation_function.threshold` [d_tc] (JumpReLU; ReLU without it).

circuit-tracer encodes `pre = x @ W_enc.T + b_enc` (no b_dec subtracted) and applies ReLU or `pre *
(pre > threshold)`. Its released package (0.5.0) reads no TopK transcoders: a TopK set is refused
unless `topk=True`, which writes `activation: topk` and `k` for builds that read them. BatchTopK /
Matryoshka transcoders export exactly as JumpReLU through their learned threshold (thresholds are
clamped at 0, where `relu(pre) * (pre > t)` is unchanged).

The folder has the layout of circuit-tracer's own transcoder cache, so
`ReplacementModel.from_pretrained(model, "/absolute/path/to/folder")` loads it with no hub access.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import (
    atomic_folder,
    atomic_write,
    atomic_write_text,
    error_summary,
    inside,
    read_safetensors,
)
from .hooks import mlp_hooks, mlp_layer
from .saelens import hf_model_name
from .weights import Weights

CONFIG = "config.yaml"
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def export_circuit_tracer(layers: list[Weights], out: str | Path, model_name: str | None = None,
                          topk: bool = False) -> Path:
    """Write one transcoder per layer (`layers[i]` is layer i's, reading its MLP's input and writing
    its output) as a circuit-tracer transcoder set at `out` (the folder replaced whole)."""
    import yaml
    from safetensors.torch import save_file

    if not layers:
        raise ValueError("a transcoder set needs one transcoder per layer, got none")
    model_name = hf_model_name(model_name or layers[0].model_name)
    if not model_name:
        raise ValueError("circuit-tracer needs the model's name: pass model_name= (e.g. a hub id)")
    states, activations = [], set()
    for index, weights in enumerate(layers):
        where = f"layer {index}'s dictionary"
        if not weights.transcoder or weights.d_in != weights.d_out:
            raise ValueError(f"{where} must be a transcoder from the MLP input to the MLP output "
                             "(d_model -> d_model), got "
                             f"{'a transcoder' if weights.transcoder else 'an SAE'} {weights.d_in} "
                             f"-> {weights.d_out}")
        if weights.hooks and mlp_layer(weights.hooks, weights.model_name) != index:
            raise ValueError(f"{where} reads {weights.hooks[0]} and writes {weights.hooks[-1]}, "
                             f"not layer {index}'s MLP input and output (circuit-tracer's "
                             f"{INPUT_HOOK} -> {OUTPUT_HOOK})")
        if weights.activation == "topk" and not topk:
            raise ValueError(f"{where} is a TopK transcoder, which circuit-tracer 0.5.0 (PyPI) "
                             "cannot read (it would apply a plain ReLU); train BatchTopK or "
                             "JumpReLU transcoders (exported exactly as JumpReLU), or pass "
                             "topk=True for circuit-tracer builds that read `activation: topk`")
        activations.add((weights.activation, weights.k if weights.activation == "topk" else None))
        state = {"W_enc": weights.W_enc, "b_enc": weights.b_enc, "W_dec": weights.W_dec,
                 "b_dec": weights.b_dec}
        if weights.activation == "jumprelu":
            state["activation_function.threshold"] = weights.threshold.clamp_min(0)
        if weights.W_skip is not None:
            state["W_skip"] = weights.W_skip
        states.append({name: tensor.float().contiguous() for name, tensor in state.items()})
    if len({a for a, _ in activations} - {"relu", "jumprelu"}) and len(activations) > 1:
        raise ValueError("a TopK set must use one k on every layer, got "
                         f"{sorted(activations, key=str)}")
    if len({"W_skip" in state for state in states}) > 1:
        raise ValueError("circuit-tracer needs a skip connection on every layer or on none")
    config: dict[str, Any] = {"model_kind": "transcoder_set", "model_name": model_name,
                              "feature_input_hook": INPUT_HOOK, "feature_output_hook": OUTPUT_HOOK,
                              "exported_by": "dictionary_learning"}
    own_name = layers[0].model_name
    if own_name and own_name != model_name and hf_model_name(own_name) == model_name:
        config["lm_name"] = own_name  # this toolkit's offline name, which the import restores
    kinds = {a for a, _ in activations}
    if kinds == {"topk"}:
        config.update(activation="topk", k=next(iter(activations))[1])
    elif kinds == {"relu"}:
        config["activation"] = "relu"
    names = [layer_file(i) for i in range(len(layers))]
    with atomic_folder(out,
                       owned=lambda name: name == CONFIG or name.startswith("layer_")) as staging:
        for name, state in zip(names, states):
            atomic_write(staging / name, lambda tmp, state=state: save_file(state, tmp))
        # safe_dump quotes any value that YAML would otherwise read as more keys (a name holding a
        # newline)
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
        atomic_write_text(staging / CONFIG, text)  # last: circuit-tracer's "complete" marker
    return Path(out)


def _read_config(folder: Path) -> dict[str, Any]:
    """The flat `key: value` lines of a transcoder set's config.yaml (as this format uses them)."""
    import yaml

    try:
        config = yaml.safe_load((folder / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{str(folder / CONFIG)!r} is not a valid YAML file (corrupt or "
                         f"truncated?): {error_summary(error)}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{str(folder / CONFIG)!r} is not a YAML mapping")
    return config


def load_circuit_tracer(folder: str | Path) -> list[Weights]:
    """The library-neutral weights of every layer of a circuit-tracer transcoder set folder (local
    files: a hub set is fetched first with huggingface_hub, e.g. `snapshot_download`)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise ValueError(f"expected a circuit-tracer transcoder set folder with {CONFIG}, got "
                         f"{str(folder)!r}")
    config = _read_config(folder)
    if config.get("model_kind") != "transcoder_set":
        raise ValueError(f"{str(folder)!r}: model_kind {config.get('model_kind')!r} is not "
                         "convertible (only transcoder_set; cross-layer transcoders have no "
                         "equivalent here)")
    hooks = (config.get("feature_input_hook"), config.get("feature_output_hook"))
    if hooks != (INPUT_HOOK, OUTPUT_HOOK):
        raise ValueError(f"{str(folder)!r}: only {INPUT_HOOK} -> {OUTPUT_HOOK} transcoders are "
                         f"convertible, got {hooks[0]} -> {hooks[1]}")
    model_name = config.get("model_name")
    if config.get("exported_by") == "dictionary_learning" and config.get("lm_name"):
        # the offline name this toolkit exported it from (smollm2-135m)
        model_name = config["lm_name"]
    paths = (config.get("transcoders")
             or [layer_file(i) for i in range(len(list(folder.glob("layer_*.safetensors"))))])
    if not isinstance(paths, list):
        raise ValueError(f"{str(folder / CONFIG)!r}: 'transcoders' must list the layer files, got "
                         f"{paths!r:.100}")
    layers = []
    for index, path in enumerate(paths):
        path = inside(folder, path, f"layer {index}'s file")
        if not path.is_file():
            raise ValueError(f"{str(folder)!r}: layer {index}'s file {str(path)!r} is missing")
        state = {name: tensor.float() for name, tensor in read_safetensors(path).items()}
        missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec"} - set(state))
        unused = sorted(set(state) - {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip",
                                      "activation_function.threshold"})
        if missing or unused:
            raise ValueError(f"{str(path)!r} " + (f"lacks {missing}" if missing
                                                  else f"holds {unused}, which a "
                                                       f"circuit-tracer transcoder does not use"))
        if layers and (state["W_enc"].shape != layers[0].W_enc.shape or ("W_skip" in state) != (
                layers[0].W_skip is not None)):
            raise ValueError(f"{str(path)!r}: layer {index} has W_enc "
                             f"{tuple(state['W_enc'].shape)} and "
                             f"{'a' if 'W_skip' in state else 'no'} W_skip, unlike layer 0 (W_enc "
                             f"{tuple(layers[0].W_enc.shape)}, "
                             f"{'a' if layers[0].W_skip is not None else 'no'} W_skip): a "
                             "transcoder set has one shape on every layer")
        threshold = state.get("activation_function.threshold")
        activation = config.get("activation") or ("jumprelu" if threshold is not None else "relu")
        if threshold is not None and bool((threshold < 0).any()):
            raise ValueError(f"{str(path)!r} has negative thresholds, where circuit-tracer's "
                             "JumpReLU passes negative pre-activations; this toolkit's JumpReLU "
                             "cannot (its features are never negative)")
        if activation == "topk" and "k" not in config:
            raise ValueError(f"{str(folder / CONFIG)!r} says activation: topk but gives no k")
        layers.append(Weights(W_enc=state["W_enc"], b_enc=state["b_enc"], W_dec=state["W_dec"],
                              b_dec=state["b_dec"], activation=activation, k=config.get("k"),
                              threshold=threshold if activation == "jumprelu" else None,
                              W_skip=state.get("W_skip"), transcoder=True, model_name=model_name,
                              layer=index, hooks=mlp_hooks(index, model_name)))
    return layers

"""EleutherAI sparsify's format: `<run>/<hookpoint>/cfg.json` + `sae.safetensors`, one folder per
hookpoint named by the module path inside the base model (`layers.6`, `layers.6.mlp`), as
`SparseCoder.save_to_disk` writes and `SparseCoder.load_from_disk` reads (and delphi consumes).
Weights: encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec [d_in], W_skip
[d_in, d_in] (out = ... + x @ W_skip.T).

sparsify has TopK dictionaries only; an SAE encodes x - b_dec, a transcoder (`transcode: true`) maps
its hookpoint module's input to that module's output, of the same width.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..files import atomic_folder, atomic_write, atomic_write_json, read_json, read_safetensors
from .hooks import base_prefix, full_path, mlp_layer, output_path
from .weights import Weights

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"


def hookpoint_of(weights: Weights) -> str:
    """sparsify's hookpoint for a dictionary's hook points: an SAE's module (whose output it reads),
    a transcoder's module (whose input it reads and output it writes), named inside the base
    model."""
    if not weights.hooks:
        raise ValueError("the dictionary's config names no hook points: pass hookpoint= (e.g. "
                         "'layers.6')")
    if weights.transcoder:
        source, target = weights.hooks
        same = (source["path"] == target["path"]
                and (source.get("io"), target.get("io")) == ("input", "output"))
        if not same and mlp_layer(weights.hooks, weights.model_name) is None:
            raise ValueError("a sparsify transcoder maps one module's input to its output; this "
                             f"one reads {source} and writes {target}")
        path = target["path"]
    else:
        path = output_path(weights.hooks[0], weights.model_name)
    return path.removeprefix(base_prefix(path, weights.model_name))


def check_hookpoint(hookpoint: Any) -> str:
    """A hookpoint is a module name (`layers.6.mlp`), used as a folder name inside the run folder:
    never a path that could lead outside it (absolute, `..`, separators)."""
    if not isinstance(hookpoint, str) or not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*",
                                                          hookpoint):
        raise ValueError("a sparsify hookpoint is a dotted module name such as 'layers.6' or "
                         f"'layers.6.mlp', got {hookpoint!r}")
    return hookpoint


def export_sparsify(weights: Weights, out: str | Path, hookpoint: str | None = None) -> Path:
    """Write `weights` as `out/<hookpoint>/{cfg.json, sae.safetensors}` (that folder
    replaced whole); returns it."""
    from safetensors.torch import save_file

    if weights.activation != "topk":
        raise ValueError(f"sparsify has TopK dictionaries only, this one is {weights.activation!r}")
    if weights.d_in != weights.d_out:
        raise ValueError("sparsify dictionaries map width d_in to the same width; this one maps "
                         f"{weights.d_in} to {weights.d_out}")
    hookpoint = check_hookpoint(hookpoint or hookpoint_of(weights))
    # sparsify centres every SAE, no transcoder
    weights = weights.with_centring(not weights.transcoder)
    state = {"encoder.weight": weights.W_enc, "encoder.bias": weights.b_enc, "W_dec": weights.W_dec,
             "b_dec": weights.b_dec}
    if weights.W_skip is not None:
        state["W_skip"] = weights.W_skip
    config = {"activation": "topk", "expansion_factor": max(weights.d_sae // weights.d_in, 1),
              "normalize_decoder": True, "num_latents": weights.d_sae, "k": weights.k,
              "multi_topk": False, "skip_connection": weights.W_skip is not None,
              "transcode": weights.transcoder, "d_in": weights.d_in}
    # an extra key, which sparsify's loader drops (drop_extra_fields) and `load_sparsify` reads
    if weights.model_name:
        config["model_name"] = weights.model_name
    state = {name: tensor.float().contiguous() for name, tensor in state.items()}
    target = Path(out) / hookpoint
    with atomic_folder(target, owned=lambda name: name in (CONFIG, WEIGHTS)) as staging:
        atomic_write(staging / WEIGHTS, lambda tmp: save_file(state, tmp))
        atomic_write_json(staging / CONFIG, config)
    return target


def _hookpoint_folder(path: Path, hookpoint: str | None) -> Path:
    if hookpoint:
        path = path / check_hookpoint(hookpoint)
    if (path / CONFIG).is_file():
        return path
    found = sorted(p.parent.relative_to(path).as_posix() for p in path.glob(f"*/{CONFIG}"))
    if len(found) == 1:
        return path / found[0]
    listed = (f"it holds the hookpoints {found}: pass hookpoint=" if found
              else f"it holds no */{CONFIG}")
    raise ValueError(f"expected a sparsify hookpoint folder ({CONFIG} + {WEIGHTS}) or a run folder "
                     f"holding one; {str(path)!r}: {listed}")


def load_sparsify(path: str | Path, hookpoint: str | None = None,
                  model_name: str | None = None) -> Weights:
    """The library-neutral weights of a sparsify hookpoint folder (or of a run folder's only / named
    hookpoint). model_name (default: the cfg.json's `model_name` that `export_sparsify` adds, else
    the run's config.json `model`) places the hookpoint in the causal LM's module tree."""
    folder = _hookpoint_folder(Path(path), hookpoint)
    config: dict[str, Any] = read_json(folder / CONFIG, expect=dict)
    if config.get("activation", "topk") != "topk":
        raise ValueError(f"{str(folder)!r}: sparsify activation {config.get('activation')!r} has "
                         "no equivalent here (only topk)")
    if not (folder / WEIGHTS).is_file():
        raise ValueError(f"{str(folder)!r} has {CONFIG} but no {WEIGHTS}")
    state = {name: tensor.float() for name, tensor in read_safetensors(folder / WEIGHTS).items()}
    missing = [name for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
               if name not in state]
    if missing:
        raise ValueError(f"{str(folder / WEIGHTS)!r} lacks {missing}")
    unused = sorted(set(state) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip"})
    if unused:
        raise ValueError(f"{str(folder / WEIGHTS)!r} holds {unused}, which a sparsify SparseCoder "
                         "does not use")
    shape = tuple(state["encoder.weight"].shape)
    if shape[1] != config.get("d_in"):
        raise ValueError(f"{str(folder)!r}: encoder.weight has shape {shape}, but {CONFIG} says "
                         f"d_in={config.get('d_in')}")
    if config.get("num_latents") not in (None, 0, shape[0]):
        raise ValueError(f"{str(folder)!r}: encoder.weight has {shape[0]} latents, but {CONFIG} "
                         f"says num_latents={config['num_latents']}")
    if not (isinstance(config.get("k"), int) and 0 < config["k"] <= shape[0]):
        raise ValueError(f"{str(folder)!r}: {CONFIG} says k={config.get('k')!r}; expected an int "
                         f"in [1, {shape[0]}] (the latents)")
    if "skip_connection" in config and bool(config["skip_connection"]) != ("W_skip" in state):
        raise ValueError(f"{str(folder)!r}: {CONFIG} says "
                         f"skip_connection={config['skip_connection']}, but the weights "
                         f"{'hold' if 'W_skip' in state else 'lack'} W_skip")
    run_config = folder.parent / "config.json"
    model_name = model_name or config.get("model_name")
    if model_name is None and run_config.is_file():
        run = read_json(run_config)
        model_name = run.get("model") if isinstance(run, dict) else None
    inner = folder.name if hookpoint is None else hookpoint
    path_in_model = full_path(inner, model_name)
    transcoder = bool(config.get("transcode"))
    hooks: list[dict[str, str]] = []
    if path_in_model:
        hooks = ([{"path": path_in_model, "io": "input"}, {"path": path_in_model, "io": "output"}]
                 if transcoder
                 else [{"path": path_in_model, "io": "output"}])
    layer = next((int(part) for part in inner.split(".") if part.isdigit()), None)
    weights = Weights(W_enc=state["encoder.weight"], b_enc=state["encoder.bias"],
                      W_dec=state["W_dec"], b_dec=state["b_dec"], activation="topk",
                      k=int(config["k"]), W_skip=state.get("W_skip"), centred=not transcoder,
                      transcoder=transcoder, model_name=model_name, layer=layer, hooks=hooks)
    # an SAE with a skip: here a (square) transcoder, which never centres
    if "W_skip" in state and not transcoder:
        weights = replace(weights.with_centring(False), transcoder=True)
    return weights

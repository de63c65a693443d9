"""Other libraries' file formats, both ways: SAELens (`cfg.json` + `sae_weights.safetensors`),
EleutherAI sparsify (`<hookpoint>/cfg.json` + `sae.safetensors`) and circuit-tracer's per-layer
transcoder sets (`config.yaml` + `layer_{i}.safetensors`). Every conversion goes through `Weights`
(weights.py), the one place orientations are decided; each format lives in its own module.

    export("runs/sae/trainer_0", "out/saelens", to="saelens")
    export(["tc/layer_0", "tc/layer_1", ...], "out/set", to="circuit-tracer")
    dictionary, config = load("out/saelens")
        # any of the three formats, detected from its files
    import_dictionary("out/saelens", "runs/imported")
        # as this toolkit's ae.pt + config.json folder(s)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..dictionary import Dictionary
from .circuit_tracer import export_circuit_tracer, load_circuit_tracer
from .saelens import export_saelens, load_saelens
from .sparsify import export_sparsify, load_sparsify
from .weights import Weights, dictionary_from, toolkit_config, weights_of

FORMATS = ("saelens", "sparsify", "circuit-tracer")


def _toolkit_weights(source: Any) -> Weights:
    """Weights of a saved dictionary folder, a (dictionary, config) pair or a bare dictionary."""
    from ..utils import load_dictionary

    if isinstance(source, Dictionary):
        return weights_of(source)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Dictionary):
        return weights_of(*source)
    dictionary, config = load_dictionary(source, normalize_decoder=False)
    return weights_of(dictionary, config)


def _layer_sources(source: Any) -> list[Any]:
    """One dictionary per layer for a transcoder set: a list as given, or a folder's dictionary
    subfolders in layer order (by their config's layer, else by name)."""
    if isinstance(source, (list, tuple)) and not (len(source) == 2
                                                  and isinstance(source[0], Dictionary)):
        return list(source)
    folder = Path(source)
    subfolders = [p.parent for p in folder.glob("*/config.json")]
    if not subfolders:
        raise ValueError("a transcoder set is exported from one dictionary per layer: a list of "
                         f"folders, or a folder holding them; {str(folder)!r} holds no "
                         "*/config.json")
    weights = [_toolkit_weights(p) for p in subfolders]
    if any(w.layer is None for w in weights):
        raise ValueError(f"the dictionaries in {str(folder)!r} do not all name their layer (config "
                         "trainer.layer): pass them as a list in layer order")
    return [w for w in sorted(weights, key=lambda w: w.layer)]


def export(source: Any, out: str | Path, to: str, **options: Any) -> Path:
    """Write a dictionary in another library's format. source: a saved dictionary folder (or a
    (dictionary, config) pair, or a dictionary); for circuit-tracer, one per layer (a list, or a
    folder holding them). options: SAELens `hook_name`, `hook_name_out`; sparsify `hookpoint`;
    circuit-tracer `model_name`, `topk`."""
    if to == "saelens":
        return export_saelens(_toolkit_weights(source), out, **options)
    if to == "sparsify":
        return export_sparsify(_toolkit_weights(source), out, **options)
    if to == "circuit-tracer":
        layers = [s if isinstance(s, Weights) else _toolkit_weights(s)
                  for s in _layer_sources(source)]
        return export_circuit_tracer(layers, out, **options)
    raise ValueError(f"unknown format {to!r}; formats: {FORMATS}")


def detect(path: str | Path) -> str:
    """Which format a folder holds, from its files."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return "circuit-tracer"
    if (path / "sae_weights.safetensors").is_file():
        return "saelens"
    if (path / "sae.safetensors").is_file() or any(path.glob("*/sae.safetensors")):
        return "sparsify"
    raise ValueError(f"{str(path)!r} holds none of the formats {FORMATS} (cfg.json + "
                     "sae_weights.safetensors; cfg.json + sae.safetensors, or hookpoint folders of "
                     "them; config.yaml + layer_*.safetensors)")


def load_weights(path: str | Path, format: str | None = None,
                 **options: Any) -> Weights | list[Weights]:
    """The library-neutral weights in a folder of another library's format (a list, one per layer,
    for a circuit-tracer set). options: sparsify `hookpoint`, `model_name`."""
    format = format or detect(path)
    if format == "saelens":
        return load_saelens(path)
    if format == "sparsify":
        return load_sparsify(path, **options)
    if format == "circuit-tracer":
        return load_circuit_tracer(path)
    raise ValueError(f"unknown format {format!r}; formats: {FORMATS}")


def load(path: str | Path, format: str | None = None, **options: Any) -> Any:
    """(dictionary, config) from a folder in another library's format (a list of them, one per
    layer, for a circuit-tracer set): this toolkit's class that computes the same thing."""
    weights = load_weights(path, format, **options)
    source = format or detect(path)

    def convert(w: Weights) -> tuple[Dictionary, dict[str, Any]]:
        dictionary = dictionary_from(w)
        return dictionary, toolkit_config(dictionary, w, source)

    return [convert(w) for w in weights] if isinstance(weights, list) else convert(weights)


def import_dictionary(path: str | Path, out: str | Path, format: str | None = None,
                      **options: Any) -> list[Path]:
    """Save a folder of another library's format as this toolkit's `ae.pt` + `config.json` folder at
    `out` (a circuit-tracer set: `out/layer_{i}` each). Returns the folders written."""
    from ..utils import save_dictionary

    loaded = load(path, format, **options)
    if isinstance(loaded, list):
        return [save_dictionary(d, Path(out) / f"layer_{i}", config)
                for i, (d, config) in enumerate(loaded)]
    return [save_dictionary(loaded[0], out, loaded[1])]


def export_command(paths: list[str], to: str, hook_name: str | None = None,
                   hook_name_out: str | None = None, hookpoint: str | None = None,
                   model_name: str | None = None, topk: bool = False) -> Path:
    """`python -m dictionary_learning export --to FORMAT SRC [SRC ...] DST`: the last path is where
    to write."""
    if len(paths) < 2:
        raise ValueError(f"expected SRC [SRC ...] DST, got {paths}")
    *sources, out = paths
    options = {"saelens": {"hook_name": hook_name, "hook_name_out": hook_name_out},
               "sparsify": {"hookpoint": hookpoint},
               "circuit-tracer": {"model_name": model_name, "topk": topk}}.get(to, {})
    if to != "circuit-tracer" and len(sources) != 1:
        raise ValueError(f"--to {to} exports one dictionary, got {len(sources)} sources")
    source = sources if to == "circuit-tracer" and len(sources) > 1 else sources[0]
    written = export(source, out, to, **{key: value for key, value in options.items() if value})
    print(f"wrote {to} format to {written}")
    return written


def import_command(source: str, out: str, format: str | None = None, hookpoint: str | None = None,
                   model_name: str | None = None) -> list[Path]:
    """`python -m dictionary_learning import SRC DST [--from FORMAT]`."""
    options = {key: value for key, value in (("hookpoint", hookpoint), ("model_name", model_name))
               if value}
    written = import_dictionary(source, out, format, **options)
    print(f"wrote {len(written)} dictionary folder(s): {', '.join(map(str, written))}")
    return written


__all__ = ["FORMATS", "Weights", "detect", "dictionary_from", "export", "export_circuit_tracer",
           "export_command", "export_saelens", "export_sparsify", "import_command",
           "import_dictionary", "load", "load_circuit_tracer", "load_saelens", "load_sparsify",
           "load_weights", "weights_of"]

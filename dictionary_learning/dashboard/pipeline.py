"""The dashboard pipeline: which model, hook point and features a saved dictionary needs, then one
pass over text (`collect.py`), the weights' readings (`directions.py`) and the files (`render.py`).

`dashboard(dictionary=DIR)` is what `python -m dictionary_learning dashboard` runs;
`build_dashboard` is the part that takes a loaded dictionary and model (the quickstart calls it with
the ones it has)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checks import integer, renamed_keywords
from ..checks import options as check_options
from ..data import text_source
from ..dictionary import Dictionary
from ..files import check_writable_folder, read_json
from ..models import (
    DEFAULT_MODEL,
    HookPoint,
    d_model,
    dtype_from_name,
    hook,
    load_model,
    model_fingerprint,
    n_layers,
    resolve_hook,
)
from ..scae import SCAESuite, parse_module_name, sources_of
from ..utils import load_dictionary
from .collect import StatisticsConfig, feature_statistics
from .directions import (
    Sources,
    decoder_directions,
    logit_lens,
    suite_connections,
    virtual_weight_connections,
)
from .render import feature_records, write_dashboard

LOGIT_LENS = ("promoted / suppressed tokens: the unembedding applied to the decoder direction "
              "through the final norm's weight (a logit lens; the per-token 1/rms scale and the "
              "norm's bias do not change the ranking)")


@renamed_keywords(dict_size="d_sae")
def parse_features(spec: str | int | Sequence[int], d_sae: int) -> list[int]:
    """Feature indices from a count (the first N; more than d_sae means all), "all", or a
    comma-separated list of indices and inclusive ranges ("0-99", "3,17,200-210"), in the order
    given, without repeats."""
    if isinstance(spec, str) and spec.strip().isdigit():
        spec = int(spec)
    if isinstance(spec, str) and spec.strip() == "all":
        return list(range(d_sae))
    if isinstance(spec, int) and not isinstance(spec, bool):
        return list(range(min(integer("features", spec), d_sae)))
    if isinstance(spec, str):
        indices: list[int] = []
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not match:
                raise ValueError("features must be a count, 'all', or indices and ranges such as "
                                 f"'0-99' or '3,17,200-210', got {spec!r}")
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                raise ValueError(f"features: the range {part.strip()!r} runs backwards")
            indices.extend(range(first, last + 1))
    else:
        indices = [integer("features[]", i, low=0) for i in spec]
    bad = [i for i in indices if i >= d_sae]
    if bad:
        raise ValueError(f"features must lie in [0, {d_sae - 1}] (the dictionary has "
                         f"{d_sae}), got {bad[:5]}")
    if not indices:
        raise ValueError("features: no feature indices given")
    return list(dict.fromkeys(indices))


def _sections(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer config, buffer config) of a saved config.json (its buffer, or run.buffer in
    quickstart saves before 2026-12-07)."""
    trainer = config.get("trainer", config)
    run = config.get("run")
    buffer = config.get("buffer") or (run.get("buffer") if isinstance(run, dict) else None) or {}
    return (trainer if isinstance(trainer, dict) else {}), (buffer if isinstance(buffer, dict)
                                                            else {})


def hook_from_config(model: Any, config: dict[str, Any]) -> HookPoint | None:
    """The hook point a saved dictionary reads (a transcoder's input side), as its config.json names
    it: the buffer's hook points (the trainer's entry of a buffer over many), else the trainer's
    `submodule_name` when it is a named site ("layers.6.resid"), else upstream's `layer` at the
    residual stream for io="out"; else None."""
    trainer, buffer = _sections(config)
    hooks = {}
    for spec in buffer.get("hooks") or []:
        if isinstance(spec, dict) and "path" in spec:
            point = HookPoint(spec["path"], spec.get("io", "output"), spec.get("name"))
            hooks[str(point)] = point
    submodule = buffer.get("submodule")
    if isinstance(submodule, dict):
        submodule = submodule.get(trainer.get("submodule_name"))
    if isinstance(submodule, list) and submodule:
        submodule = submodule[0]  # an in_to_out pair: the input side
    if isinstance(submodule, str) and submodule in hooks:
        return resolve_hook(model, hooks[submodule])
    name = trainer.get("submodule_name")
    if isinstance(name, str) and re.fullmatch(r"layers\.\d+\.\w+", name):
        return resolve_hook(model, name)
    layer = trainer.get("layer")
    if (isinstance(layer, int) and buffer.get("io", "out") == "out"
            and not trainer.get("transcoder")):
        print(f"config.json names layer {layer} but no hook point: reading layers.{layer}.resid "
              "(pass --site otherwise)", file=sys.stderr)
        return hook(model, layer, "resid")
    return None


def _layer_of(point: HookPoint) -> int | None:
    match = re.fullmatch(r"layers\.(\d+)\.\w+", point.name or "")
    return int(match.group(1)) if match else None


@dataclass
class DashboardConfig(StatisticsConfig):
    """What `build_dashboard` shows: which features, their source connections and the page's
    notes, with how it reads text (`StatisticsConfig`'s fields)."""

    features: str | int | Sequence[int] = 300
    """a count (the first N), "all", or indices and ranges ("0-99,512"): see `parse_features`"""
    sources: Sources | None = None
    """each feature's strongest source connections (`directions.suite_connections` or
    `directions.virtual_weight_connections`), shown on its page"""
    meta: dict[str, Any] | None = None
    """notes for dashboard.json and the page's header (dictionary, model, data: the text's name)"""


def build_dashboard(dictionary: Dictionary, model: Any, point: HookPoint, texts: Iterable[str],
                    out: str | Path, config: DashboardConfig | None = None,
                    **options: Any) -> dict[str, Any]:
    """Measure `features` of a loaded dictionary on `texts` at `point` and write the dashboard
    folder `out` (index.html, features/{index}.json, ...: see `render.py`); returns what
    dashboard.json records.
    `options`: the fields of `DashboardConfig` (or pass one as `config`; options given as well
    replace its fields).
    progress: bars on stderr over its phases that take more than a few seconds (progress.DELAY)."""
    config = check_options(DashboardConfig, config, options, "build_dashboard")
    started = time.perf_counter()
    chosen = parse_features(config.features, dictionary.d_sae)
    stats = feature_statistics(dictionary, model, point, texts, chosen, config)
    meta, sources = dict(config.meta or {}), config.sources
    if dictionary.d_out == d_model(model):
        logits = logit_lens(model, decoder_directions(dictionary, chosen))
        meta["logit_lens"] = LOGIT_LENS
    else:  # e.g. per-head activations: no direction in the residual stream to unembed
        logits = tuple(torch.empty(len(chosen), 0, dtype=dtype)
                       for dtype in (torch.long, torch.float) * 2)
        meta["logit_lens"] = ("no promoted / suppressed tokens: the dictionary writes width "
                              f"{dictionary.d_out}, not the residual stream's "
                              f"{d_model(model)}")
    layer = _layer_of(point)
    transcoder_id = f"{meta.get('model', 'model')}/{point}"
    records = feature_records(stats, transcoder_id, logits, sources, progress=config.progress)
    meta.update(hook=str(point),
                kind=f"{type(dictionary).__name__}{' transcoder' if dictionary.transcoder else ''}",
                dict_size=dictionary.d_sae, features=len(chosen), tokens=stats.tokens,
                texts=stats.texts, dead=int((stats.fired == 0).sum()),
                sources=sources.description if sources is not None else None,
                transcoder_id=transcoder_id)
    meta.setdefault("data", "python-docs")
    meta["seconds"] = round(time.perf_counter() - started, 2)
    write_dashboard(out, records, model.tokenizer, meta, layer=layer or 0, progress=config.progress)
    return meta


@dataclass
class DashboardCommandConfig:
    """The options of `dashboard` (the command): where the page goes, which model, hook point and
    text it reads a saved dictionary on (each defaults to what the dictionary's config.json says),
    and which features it shows."""

    out: str | Path = "reports/dashboard"
    """the folder written: index.html, features/"""
    model: str | None = None
    """the model (default: the one config.json or suite.json names, else smollm2-135m)"""
    layer: int | None = None
    """the layer read (default: the hook point config.json names)"""
    site: str | None = None
    """the site read at that layer, e.g. resid, mlp_in (default: as config.json says)"""
    data: str | None = None
    """the text: python-docs (default, offline), a .txt / .jsonl file or folder, or a hub dataset
    id[:split]"""
    dtype: str = "auto"
    """the model's dtype ("auto": bfloat16 where the hardware is fast at it, else float32)"""
    device: str = "cpu"
    """where the model and dictionary run"""
    ctx_len: int | None = None
    """tokens per text (default: the training buffer's, else 128)"""
    remove_bos: bool | None = None
    """leave each text's first token out (default: as the training buffer did)"""
    features: str | int = 300
    """a count (the first N), "all", or indices and ranges ("0-99,512")"""
    tokens: int = 32768
    """tokens to read"""
    texts: int | None = None
    """at most this many texts (None: as many as `tokens` needs)"""
    batch_texts: int = 16
    """texts per forward pass"""
    top_examples: int = 10
    """top activating contexts per feature"""
    source: str | Path | None = None
    """an earlier dictionary folder whose decoder writes what this one reads: each feature's
    strongest virtual weights from it (an SCAE module shows its suite's selected connections
    instead)"""
    seed: int = 0
    """seeds the sampled examples"""
    progress: bool = True
    """bars on stderr over the long phases (False: quiet)"""
    other_model: bool = False
    """read the dictionary on `model` even though its config records another model (by its
    weights' fingerprint)"""

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_texts", "top_examples"):
            integer(name, getattr(self, name))
        if self.texts is not None:
            integer("texts", self.texts)


def dashboard(dictionary: str | Path, config: DashboardCommandConfig | None = None,
              **options: Any) -> dict[str, Any]:
    """Write an offline feature dashboard of a saved dictionary (a folder with ae.pt + config.json,
    or a module folder of a saved SCAE suite) to `out/index.html`, with circuit-tracer feature files
    in `out/features/`.

    `options`: the fields of `DashboardCommandConfig` (or pass one as `config`; options given as
    well replace its fields); the model, hook point, ctx_len and remove_bos default to what the
    dictionary's config.json (or suite.json) says. A dictionary whose config records the model it
    was trained on (its fingerprint) is refused on another model, unless `other_model`."""
    started = time.perf_counter()
    config = check_options(DashboardCommandConfig, config, options, "dashboard")
    folder, out = Path(dictionary), config.out
    if (folder / "suite.json").exists():
        modules = read_json(folder / "suite.json", expect=dict).get("modules")
        raise ValueError(f"{str(folder)!r} is a whole SCAE suite: pass one of its modules, e.g. "
                         f"{str(folder / (modules or ['mlp_0'])[-1])!r}")
    check_writable_folder("out", out)
    suite, module = None, None
    if (folder.parent / "suite.json").exists():
        suite, module = SCAESuite.load(folder.parent), folder.name
        loaded, saved = suite[module], {}
    else:
        loaded, saved = load_dictionary(folder)
    trainer, buffer = _sections(saved)
    model_name = (config.model or trainer.get("lm_name") or (suite.model_name if suite else None)
                  or DEFAULT_MODEL)
    lm = load_model(model_name, device=config.device,
                    dtype=dtype_from_name(config.dtype, config.device))
    if loaded.d_in != d_model(lm):
        raise ValueError(f"the dictionary reads vectors of width {loaded.d_in}, but "
                         f"{model_name!r} has width {d_model(lm)}: pass the model it was trained "
                         "on (--model)")
    recorded = buffer.get("model_fingerprint") or (suite.model_fingerprint if suite is not None
                                                   else None)
    if recorded and model_fingerprint(lm) not in (None, recorded) and not config.other_model:
        raise ValueError(f"the dictionary was trained on another model than this {model_name!r} "
                         "(their weights differ): pass the model it was trained on (--model), or "
                         "other_model=True (--other-model) to read it on this one anyway")
    layer, site = config.layer, config.site
    if suite is not None and layer is None and site is None:
        kind, module_layer = parse_module_name(module)
        point = hook(lm, module_layer, "attn_out" if kind == "attn" else "mlp_in")
    elif layer is not None or site is not None:
        default_layer = (trainer.get("layer") if isinstance(trainer.get("layer"), int)
                         else n_layers(lm) // 2)
        point = hook(lm, default_layer if layer is None else layer, site or "resid")
    else:
        point = hook_from_config(lm, saved)
        if point is None:
            raise ValueError(f"{str(folder / 'config.json')!r} does not say which hook point the "
                             "dictionary reads: pass --layer and --site")
    loaded = loaded.to(config.device)
    connections = None
    chosen = parse_features(config.features, loaded.d_sae)
    if suite is not None:
        connections = suite_connections(suite, lm, module, chosen,
                                        source_names=sources_of(module, lm))
    elif config.source is not None:
        earlier, _ = load_dictionary(config.source, device=config.device)
        reads_mlp = (point.name or "").endswith(".mlp_in")
        connections = virtual_weight_connections(loaded, earlier, chosen,
                                                 Path(config.source).name, model=lm,
                                                 layer=_layer_of(point) if reads_mlp else None)
    named = folder.resolve()
    meta = {"dictionary": f"{named.parent.name}/{named.name}" if named.parent.name else named.name,
            "model": model_name, "data": config.data or "python-docs"}
    print(f"{model_name} {point}: dashboard of {len(chosen)} of {loaded.d_sae} features on up "
          f"to {config.tokens} tokens", file=sys.stderr)
    remove_bos = (config.remove_bos if config.remove_bos is not None
                  else bool(buffer.get("remove_bos", True)))
    meta = build_dashboard(
        loaded, lm, point, text_source(config.data), out, features=chosen, tokens=config.tokens,
        max_texts=config.texts, ctx_len=config.ctx_len or int(buffer.get("ctx_len") or 128),
        batch_texts=config.batch_texts, remove_bos=remove_bos, top_examples=config.top_examples,
        sources=connections, meta=meta, seed=config.seed, progress=config.progress)
    meta["seconds_total"] = round(time.perf_counter() - started, 2)
    print(f"dashboard of {meta['features']} features ({meta['dead']} dead on {meta['tokens']} "
          f"tokens) written to {out}/index.html (open it in a browser) and {out}/features/ in "
          f"{meta['seconds_total']:.0f} s")
    return meta

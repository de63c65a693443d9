"""From measured statistics to files: per-feature records in circuit-tracer's feature-file schema
(`circuit_tracer/frontend/feature_models.py`: index, transcoder_id, examples_quantiles, top_logits,
bottom_logits, act_min, act_max, quantile_values, histogram, activation_frequency), the same data
compacted into one self-contained HTML page (`template.html`, all JS and CSS inline), and the folder
that holds both:

    index.html                 the dashboard: open it from disk
    features/{index}.json      one feature file each, the "simple" form circuit-tracer's viewer
                               fetches as `{scan}/{featureIndex}.json` for a scan starting
                               with "./"
    features/index.json.gz     the binary form its local server reads with `--features_dir`
                               (newer circuit-tracer):
    features/layer_{L}.bin     per layer a file of records (4-byte little-endian length, then
                               the zlib-compressed JSON) at offsets[feature] ..
                               offsets[feature + 1], graph features named by the Cantor pairing
                               of (layer, feature)
    dashboard.json             what was read and how (model, hook point, tokens, texts, features)
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..checks import renamed_keywords
from ..files import atomic_folder
from ..progress import progress_bar
from .collect import BEFORE, FeatureStatistics
from .directions import Sources

# the entries a dashboard folder's save replaces
OWNED = ("index.html", "features", "dashboard.json")


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def _rows(table: dict[str, torch.Tensor], feature: int, order_by: str,
          descending: bool) -> list[dict[str, Any]]:
    """The rows of an example table for one feature (its position in the statistics), ordered."""
    chosen = (table["feature"] == feature).nonzero().flatten()
    chosen = chosen[table[order_by][chosen].argsort(descending=descending, stable=True)]
    return [{"value": float(table["value"][i]), "text": int(table["text"][i]),
             "position": int(table["position"][i]),
             "ids": table["ids"][i].tolist(), "acts": table["acts"][i].tolist()}
            for i in chosen.tolist()]


def _example(row: dict[str, Any], seen: set[Any]) -> dict[str, Any]:
    """An example as circuit-tracer's `Example` holds it, token ids in place of strings (`ids`);
    repeated: its text, or the same tokens (a corpus holding a passage twice), came in an earlier
    example of the feature."""
    keep = [i for i, token in enumerate(row["ids"]) if token >= 0]
    tokens = tuple(row["ids"][i] for i in keep)
    repeated = row["text"] in seen or tokens in seen
    seen.update((row["text"], tokens))
    return {"ids": [row["ids"][i] for i in keep],
            "tokens_acts_list": [_round(row["acts"][i]) for i in keep],
            "train_token_ind": keep.index(BEFORE), "is_repeated_datapoint": repeated}


@renamed_keywords(upstream="sources")
def feature_records(stats: FeatureStatistics, transcoder_id: str, logits: tuple[torch.Tensor, ...],
                    sources: Sources | None = None, n_bands: int = 4, per_band: int = 5,
                    bins: int = 40, progress: bool = True) -> list[dict[str, Any]]:
    """One record per feature of `stats`: circuit-tracer's fields (examples with token ids in `ids`,
    logits as ids in `top_ids` / `bottom_ids`; `with_strings` turns them into its strings) and the
    page's extras (density counts, logit values, source connections). Examples: the top
    activations, then `n_bands` bands of equal probability of the feature's non-zero activations
    (from the sample), `per_band` each, highest band first. `histogram`: `bins` bins from act_min to
    act_max of the non-zero activations, counts estimated from the reservoir sample (exact while a
    feature fired no more often than the reservoir holds).
    progress: a bar on stderr when this takes more than a few seconds."""
    top_ids, top_values, bottom_ids, bottom_values = logits
    records = []
    features = progress_bar(stats.features, desc="dashboard: feature records", enabled=progress,
                            unit="feature")
    for j, index in enumerate(features):
        fired = int(stats.fired[j])
        values = stats.values["value"][stats.values["feature"] == j].double()
        act_max = float(stats.max_value[j])
        act_min = min(0.0, float(values.min())) if len(values) else 0.0
        seen: set[Any] = set()
        top = _rows(stats.top, j, "value", True)
        quantiles = [{"quantile_name": "Top activations",
                      "examples": [_example(row, seen) for row in top]}]
        if len(values):
            edges = torch.quantile(values,
                                   torch.linspace(0, 1, n_bands + 1, dtype=torch.float64)).tolist()
            shown = {(row["text"], row["position"]) for row in top}
            sample = [row for row in _rows(stats.sample, j, "key", False)
                      if (row["text"], row["position"]) not in shown]
            for band in reversed(range(n_bands)):
                low, high = edges[band], edges[band + 1]
                rows = [row for row in sample
                        if (low < row["value"] <= high or (band == 0 and row["value"] == low))]
                if rows:
                    name = (f"Quantile {100 * band // n_bands}-{100 * (band + 1) // n_bands}% "
                            f"({low:.3g} to {high:.3g})")
                    quantiles.append({"quantile_name": name,
                                      "examples": [_example(r, seen) for r in rows[:per_band]]})
        histogram = torch.zeros(bins, dtype=torch.float64)
        if len(values) and act_max > act_min:
            histogram = torch.histc(values, bins, act_min, act_max) * (fired / len(values))
        quantile_values = (torch.quantile(values, torch.linspace(0.01, 1, 100,
                                                                 dtype=torch.float64)).tolist()
                           if len(values) else [])
        records.append({
            "index": index, "transcoder_id": transcoder_id, "examples_quantiles": quantiles,
            "top_ids": top_ids[j].tolist(), "bottom_ids": bottom_ids[j].tolist(),
            "top_logit_values": [_round(v) for v in top_values[j].tolist()],
            "bottom_logit_values": [_round(v) for v in bottom_values[j].tolist()],
            "act_min": _round(act_min), "act_max": _round(act_max),
            "quantile_values": [_round(v) for v in quantile_values],
            "histogram": [_round(v) for v in histogram.tolist()],
            "activation_frequency": float(stats.density[j]), "fired": fired,
            "sampled": len(values) < fired,
            "sources": sources.connections[j] if sources is not None else None,
        })
    return records


def token_strings(tokenizer: Any, ids: set[int]) -> dict[int, str]:
    """Each token id as the text it decodes to alone."""
    ordered = sorted(ids)
    return dict(zip(ordered, tokenizer.batch_decode([[i] for i in ordered])))


def _used_ids(records: list[dict[str, Any]]) -> set[int]:
    ids = set()
    for record in records:
        ids.update(record["top_ids"], record["bottom_ids"])
        for quantile in record["examples_quantiles"]:
            for example in quantile["examples"]:
                ids.update(example["ids"])
    return ids


def circuit_tracer_feature(record: dict[str, Any], strings: dict[int, str]) -> dict[str, Any]:
    """A record as circuit-tracer's feature file (`Model` in its frontend/feature_models.py),
    nothing more."""
    quantiles = [{"quantile_name": q["quantile_name"],
                  "examples": [{"tokens_acts_list": e["tokens_acts_list"],
                                "train_token_ind": e["train_token_ind"],
                                "is_repeated_datapoint": e["is_repeated_datapoint"],
                                "tokens": [strings[i] for i in e["ids"]]} for e in q["examples"]]}
                 for q in record["examples_quantiles"]]
    return {"index": record["index"], "transcoder_id": record["transcoder_id"],
            "examples_quantiles": quantiles, "top_logits": [strings[i] for i in record["top_ids"]],
            "bottom_logits": [strings[i] for i in record["bottom_ids"]],
            **{key: record[key] for key in ("act_min", "act_max", "quantile_values", "histogram",
                                            "activation_frequency")}}


def page_data(records: list[dict[str, Any]], strings: dict[int, str],
              meta: dict[str, Any]) -> dict[str, Any]:
    """The page's data: token strings once in `vocab`, examples and logits as positions in it."""
    position = {token: i for i, token in enumerate(sorted(strings))}
    vocab = [strings[token] for token in sorted(strings)]
    features = []
    for record in records:
        top = record["examples_quantiles"][0]["examples"]
        counts = Counter(vocab[position[e["ids"][e["train_token_ind"]]]] for e in top)
        features.append({
            "index": record["index"], "density": record["activation_frequency"],
            "fired": record["fired"], "max": record["act_max"], "min": record["act_min"],
            "top_tokens": [t for t, _ in counts.most_common(5)], "histogram": record["histogram"],
            "sampled": record["sampled"],
            "top_logits": [[position[i], v]
                           for i, v in zip(record["top_ids"], record["top_logit_values"])],
            "bottom_logits": [[position[i], v]
                              for i, v in zip(record["bottom_ids"], record["bottom_logit_values"])],
            "bands": [{"name": q["quantile_name"],
                       "examples": [{"t": [position[i] for i in e["ids"]],
                                     "a": e["tokens_acts_list"], "at": e["train_token_ind"],
                                     "r": e["is_repeated_datapoint"]}
                                    for e in q["examples"]]} for q in record["examples_quantiles"]],
            "sources": record["sources"],
        })
    return {"meta": meta, "vocab": vocab, "features": features}


def render_html(data: dict[str, Any]) -> str:
    """The page: the template with the data inlined as JSON (every "<" escaped, so no text can close
    the script)."""
    template = resources.files(__package__).joinpath("template.html").read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    name = data["meta"].get("dictionary", "dictionary")
    title = f"{name} features".replace("&", "&amp;").replace("<", "&lt;")
    return template.replace("__TITLE__", title).replace("__DASHBOARD_DATA__", payload)


def _binary_form(folder: Path, files: dict[int, bytes], layer: int) -> None:
    """features/index.json.gz and layer_{layer}.bin, as circuit-tracer's local server
    (--features_dir) reads them."""
    offsets, chunks, offset = [], [], 0
    for feature in range(max(files) + 1):
        offsets.append(offset)
        if feature in files:
            compressed = zlib.compress(files[feature])
            chunks.append(struct.pack("<I", len(compressed)) + compressed)
            offset += len(chunks[-1])
    offsets.append(offset)
    name = f"layer_{layer}.bin"
    (folder / name).write_bytes(b"".join(chunks))
    index = {str(layer): {"filename": name, "offsets": offsets}}
    (folder / "index.json.gz").write_bytes(gzip.compress(json.dumps(index).encode()))


def write_dashboard(out: str | Path, records: list[dict[str, Any]], tokenizer: Any,
                    meta: dict[str, Any], layer: int = 0, progress: bool = True) -> Path:
    """Write the dashboard folder (see the module's docstring), replacing its earlier dashboard
    files as a whole (with a bar over the feature files on stderr when that takes a few seconds)."""
    strings = token_strings(tokenizer, _used_ids(records))
    html = render_html(page_data(records, strings, meta))
    with atomic_folder(out, owned=lambda name: name in OWNED) as staging:
        (staging / "index.html").write_text(html, encoding="utf-8")
        features = staging / "features"
        features.mkdir()
        files = {}
        bar = progress_bar(records, desc="dashboard: writing feature files", enabled=progress,
                           unit="feature")
        for record in bar:
            files[record["index"]] = json.dumps(circuit_tracer_feature(record, strings),
                                                ensure_ascii=False).encode()
            (features / f"{record['index']}.json").write_bytes(files[record["index"]])
        _binary_form(features, files, layer)
        (staging / "dashboard.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return Path(out)

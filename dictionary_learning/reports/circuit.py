"""`circuit_report`: a sparse feature circuit over saved dictionaries or an SCAE suite (`python -m
dictionary_learning circuit`): node effects on prompt pairs, faithfulness and completeness against
the threshold by mean ablations, edges, the graph (PNG and circuit-tracer JSON), results.json; for
a suite, in its replacement model, with its exact connection edges and their agreement with the
attribution edges."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any

from ..circuits import (
    Site,
    agreement_pairs,
    build_graph,
    circuit_nodes,
    draw_curve,
    draw_graph,
    edge_effects,
    encode_pairs,
    faithfulness_curve,
    feature_labels,
    load_prompt_pairs,
    logit_difference,
    node_state,
    single_token_pairs,
    write_circuit_tracer_graph,
)
from ..circuits.scae import suite_edges, suite_sites
from ..data import text_source
from ..files import atomic_write_json
from ..formats.weights import saved_hooks
from ..models import DEFAULT_MODEL, HookPoint, load_model
from ..progress import phase
from ..scae import SCAESuite
from ..utils import load_dictionary


def saved_sites(folders: list[str | Path]) -> tuple[list[Site], str | None]:
    """A `Site` per saved dictionary folder, at the hook points its config.json names (a
    transcoder: its input and output sides), named after its (output) hook point; and the model
    the first config names."""
    sites, model_name = [], None
    for folder in folders:
        dictionary, config = load_dictionary(folder)
        hooks = [HookPoint(h["path"], h["io"], h.get("name")) for h in saved_hooks(config)]
        transcoder = bool(getattr(dictionary, "transcoder", False))
        if len(hooks) != (2 if transcoder else 1):
            raise ValueError(f"{str(folder)!r}: its config.json names {len(hooks)} hook points; "
                             f"{'a transcoder' if transcoder else 'an SAE'} needs "
                             f"{2 if transcoder else 1} to place it in the model")
        point = hooks[-1]
        sites.append(Site(str(point), dictionary, point, hooks[0] if transcoder else None))
        model_name = model_name or config.get("trainer", {}).get("lm_name")
    return sites, model_name


def circuit_report(dictionaries: list[str] | None = None, model: str | None = None,
                   case: str = "simple", suite: str | None = None,
                   prompts: str | None = None, pairs: int = 32, method: str = "ig",
                   steps: int = 10, thresholds: str = "0.5,0.2,0.1,0.05,0.02,0.01",
                   graph_threshold: float = 0.1, edges: bool = True, label_texts: int = 200,
                   dashboards: str | None = None, out: str | Path = "reports/circuit",
                   progress: bool = True) -> dict[str, Any]:
    """The circuit of the saved `dictionaries` (folders) for `pairs` prompt pairs: subject-verb
    agreement of `case`, or the JSONL file `prompts` (the paper's format). Thresholds (node
    effects summed over positions, averaged over examples) are fractions of the largest; the graph
    is drawn at `graph_threshold` of it, its features labelled by their top activating tokens on
    the first `label_texts` texts of the offline corpus (0: by index only). dashboards:
    comma-separated SITE=PAGE, a site's dictionary's dashboard page (`dashboard` writes
    index.html), which its nodes in circuit.svg link to. suite: a saved SCAE suite folder instead
    of `dictionaries`: the circuit of its replacement model, drawn with its exact connection edges
    (`circuits.scae`), their agreement with the attribution edges in the results. Writes
    circuit.png, circuit.svg, circuit.json (circuit-tracer's graph), faithfulness.png and
    results.json (the curve among them) to `out`; returns the results."""
    if bool(dictionaries) == (suite is not None):
        raise ValueError("give saved dictionary folders or an SCAE suite folder (suite=...), "
                         f"one of the two; got {len(dictionaries or [])} dictionaries and "
                         f"suite={suite!r}")
    pages = {}
    for entry in filter(None, (dashboards or "").split(",")):
        site, _, page = entry.partition("=")
        if not page:
            raise ValueError(f"dashboards: expected SITE=PAGE entries, got {entry!r}")
        pages[site.strip()] = page.strip()
    try:
        fractions = [float(x) for x in str(thresholds).split(",")]
    except ValueError:
        raise ValueError(f"thresholds must be comma-separated numbers (fractions of the largest "
                         f"node effect), got {thresholds!r}") from None
    scae = SCAESuite.load(suite) if suite is not None else None
    sites, trained_on = (saved_sites(dictionaries) if scae is None else ([], scae.model_name))
    name = model or trained_on or DEFAULT_MODEL
    with phase(f"loading {name} ...", progress):
        # a suite's linearisation reads the attention patterns
        lm = load_model(name, **({} if scae is None else {"attn_implementation": "eager"}))
    if scae is not None:
        sites = suite_sites(scae, lm)  # (checks the suite against the model)
    source = load_prompt_pairs(prompts) if prompts else agreement_pairs(case, n=4 * pairs)
    kept = single_token_pairs(source, lm.tokenizer)
    by_length: dict[int, list] = {}
    for pair in kept:
        by_length.setdefault(len(lm.tokenizer(pair.clean)["input_ids"]), []).append(pair)
    if not by_length:
        raise ValueError(f"no prompt pair has single-token answers and clean / patch prompts of "
                         f"one length with {name}'s tokenizer")
    chosen = max(by_length.values(), key=len)[:pairs]
    batch = encode_pairs(chosen, lm.tokenizer)
    metric = logit_difference(batch["clean_answer_ids"], batch["patch_answer_ids"])
    seconds, started = {}, time.perf_counter()
    with phase(f"node effects ({method}) on {len(chosen)} pairs at {len(sites)} sites ...",
               progress):
        state = node_state(lm, sites, batch["clean_ids"], batch["patch_ids"], metric,
                           method=method, steps=steps, errors="keep" if scae is None else "zero")
    summed = state.effects.summed().mean()
    largest = max(float(v.abs().max()) for v in [*summed.features.values(),
                                                 *(e[None] for e in summed.errors.values())])
    seconds["nodes"], started = time.perf_counter() - started, time.perf_counter()
    with phase(f"faithfulness at {len(fractions)} thresholds ...", progress):
        curve = faithfulness_curve(lm, state, metric, [largest * f for f in fractions])
    seconds["faithfulness"], started = time.perf_counter() - started, time.perf_counter()
    shown = largest * graph_threshold
    found, agreement = {}, {}
    if edges:
        with phase("edges ...", progress):
            if scae is None:
                found = edge_effects(lm, state=state, node_threshold=shown / 4)
            else:  # the suite's own edges drawn; the attribution edges beside them
                found, _, agreement = suite_edges(scae, lm, state, node_threshold=shown / 4)
        seconds["edges"] = time.perf_counter() - started
    labels = {}
    if label_texts:
        in_circuit = circuit_nodes(state, shown)
        with phase(f"labels from {label_texts} texts ...", progress):
            labels = feature_labels(lm, sites, {n: k[:-1].nonzero().flatten().tolist()
                                                for n, k in in_circuit.items()},
                                    list(itertools.islice(text_source(None), label_texts)))
    graph = build_graph(state, found, node_threshold=shown, edge_threshold=shown / 10,
                        labels=labels, dashboards=pages)
    out = Path(out)
    draw_graph(graph, out / "circuit.png")
    draw_graph(graph, out / "circuit.svg")
    draw_curve(curve, out / "faithfulness.png")
    tokens = [lm.tokenizer.decode(int(t)) for t in batch["clean_ids"][0]]
    write_circuit_tracer_graph(graph, out / "circuit.json", tokens)
    results = {"model": name, "sites": [site.name for site in sites], "pairs": len(chosen),
               "example": dataclasses.asdict(chosen[0]), "method": method, "steps": steps,
               "metric": graph.metric, "largest_node_effect": largest,
               "curve": [dataclasses.asdict(point) for point in curve],
               "graph": {"nodes": len(graph.nodes), "links": len(graph.links),
                         "threshold": shown}, "seconds": seconds}
    if scae is not None:
        results["suite"] = str(suite)
        results["edge_agreement"] = [dataclasses.asdict(a) for a in agreement.values()]
    atomic_write_json(out / "results.json", results)
    for point in curve:
        print(f"threshold {point.threshold:.4g}: {point.nodes} features + {point.error_nodes} "
              f"error nodes, faithfulness {point.faithfulness:.3f}, completeness "
              f"{point.completeness:.3f}")
    for a in agreement.values():
        print(f"{a.upstream} -> {a.downstream}: the connections carry {a.captured:.1%} of the "
              f"attribution edges' |effect|; exact vs attribution on them: relative error "
              f"{a.error_on_connections:.3f}, correlation {a.correlation:.3f}")
    print(f"graph: {len(graph.nodes)} nodes, {len(graph.links)} edges -> {out / 'circuit.png'}, "
          f"{out / 'circuit.json'}")
    return results

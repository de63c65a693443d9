"""A sparse feature circuit for subject-verb agreement in SmolLM2 (Marks et al. 2024), on CPU: SAEs
on the residual stream of a few layers (trained here from one collection pass, or read back), the
node effects of every feature and error node by integrated gradients on clean / patch prompt pairs
("The author" -> " is" / "The authors" -> " are"), the edges between consecutive sites, the
circuit's faithfulness and completeness at a few thresholds by real mean ablations, and the graph.

    python demos/feature_circuit.py                        # SmolLM2-135M, resid of 6 layers
    python demos/feature_circuit.py --layers 3,9 --steps 30 --pairs 8    # a quick check

The prompts need a tokenizer in which " is" / " are" are single tokens (SmolLM2's; the tiny test
models' byte tokenizer is not one).

Writes runs/feature_circuit/: the SAEs (sae/trainer_*), circuit.png, faithfulness.png,
circuit.json (circuit-tracer's graph format) and results.json.
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.circuits import (
    agreement_pairs,
    build_graph,
    circuit_nodes,
    draw_graph,
    edge_effects,
    encode_pairs,
    faithfulness_curve,
    feature_labels,
    logit_difference,
    node_state,
    single_token_pairs,
    write_circuit_tracer_graph,
)
from dictionary_learning.models import d_model, n_layers
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary


def parser() -> argparse.ArgumentParser:
    """The demo's options; their defaults are the settings the demo was written with."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), tiny-llama, a local folder or a hub id")
    p.add_argument("--layers", default=None,
                   help="residual layers with an SAE, comma-separated (default: 6 evenly spaced)")
    p.add_argument("--steps", type=int, default=300,
                   help="SAE training steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=1024, help="tokens per step (default %(default)s)")
    p.add_argument("--case", default="simple",
                   help="simple, within_rc, across_rc or nounpp (default %(default)s)")
    p.add_argument("--pairs", type=int, default=32, help="prompt pairs (default %(default)s)")
    p.add_argument("--ig-steps", type=int, default=10, help="IG steps (default %(default)s)")
    p.add_argument("--out", default="runs/feature_circuit", help="(default %(default)s)")
    return p


def saes(model, layers: list[int], args) -> dict:
    """One TopK SAE per residual layer, trained from one collection pass (read back when saved)."""
    folder = Path(args.out) / "sae"
    points = {f"resid_{layer}": hook(model, layer, "resid") for layer in layers}
    if not all((folder / f"trainer_{i}" / "config.json").exists() for i in range(len(layers))):
        width = d_model(model)
        buffer = ActivationBuffer(default_corpus(repeat=True), model, points, n_ctxs=128,
                                  ctx_len=128, refresh_batch_size=32, out_batch_size=args.batch,
                                  remove_bos=True, max_activation_norm_multiple=10)
        configs = [dict(trainer=TopKTrainer, activation_dim=width, dict_size=4 * width, k=32,
                        lr=1e-3, steps=args.steps, warmup_steps=max(1, args.steps // 10),
                        seed=0, layer=layer, lm_name=args.model, submodule_name=name)
                   for name, layer in zip(points, layers)]
        trainSAE(buffer, configs, args.steps, save_dir=folder, normalize_activations="d_model",
                 log_steps=max(1, args.steps // 5))
    return {name: (load_dictionary(folder / f"trainer_{i}")[0], point)
            for i, (name, point) in enumerate(points.items())}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = Path(args.out)
    model = load_model(args.model)  # float32: gradients of a bfloat16 model are too coarse
    layers = ([int(x) for x in args.layers.split(",")] if args.layers else
              sorted({round(i * (n_layers(model) - 1) / 5) for i in range(6)}))
    started = time.perf_counter()
    sites = saes(model, layers, args)
    trained = time.perf_counter() - started

    pairs = single_token_pairs(agreement_pairs(args.case, n=4 * args.pairs, seed=0),
                               model.tokenizer)
    lengths = {}
    for pair in pairs:  # the most common prompt length, so the batch needs no padding
        lengths.setdefault(len(model.tokenizer(pair.clean)["input_ids"]), []).append(pair)
    if not lengths:
        raise SystemExit(f"no {args.case} pair has single-token answers with {args.model}'s "
                         "tokenizer: use a model whose tokenizer has them (smollm2-135m)")
    pairs = max(lengths.values(), key=len)[:args.pairs]
    batch = encode_pairs(pairs, model.tokenizer)
    metric = logit_difference(batch["clean_answer_ids"], batch["patch_answer_ids"])
    print(f"{len(pairs)} {args.case} pairs, e.g. {pairs[0].clean!r} -> {pairs[0].clean_answer!r}"
          f" / {pairs[0].patch!r} -> {pairs[0].patch_answer!r}")

    started = time.perf_counter()
    state = node_state(model, sites, batch["clean_ids"], batch["patch_ids"], metric,
                       method="ig", steps=args.ig_steps)
    nodes_seconds = time.perf_counter() - started
    effects = state.effects.summed().mean()
    largest = max(float(torch.cat([effects.features[n], effects.errors[n][None]]).abs().max())
                  for n in effects.features)
    print(f"metric (logit diff patch - clean): clean {state.effects.clean.mean():.3f}, patch "
          f"{state.effects.patched.mean():.3f}; node effects in {nodes_seconds:.1f} s")

    thresholds = [largest * f for f in (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)]
    started = time.perf_counter()
    curve = faithfulness_curve(model, state, metric, thresholds)
    for point in curve:
        print(f"threshold {point.threshold:.4f}: {point.nodes} features + {point.error_nodes} "
              f"error nodes, faithfulness {point.faithfulness:.3f}, completeness "
              f"{point.completeness:.3f}")
    curve_seconds = time.perf_counter() - started

    shown = thresholds[2]
    started = time.perf_counter()
    edges = edge_effects(model, state=state, node_threshold=shown / 4)
    edges_seconds = time.perf_counter() - started
    kept = circuit_nodes(state, shown)
    labels = feature_labels(model, state.sites, {n: k[:-1].nonzero().flatten().tolist()
                                                 for n, k in kept.items()},
                            list(itertools.islice(default_corpus(), 200)))
    graph = build_graph(state, edges, node_threshold=shown, edge_threshold=shown / 10,
                        labels=labels)
    draw_graph(graph, out / "circuit.png", title=f"{args.case} agreement in {args.model}: nodes "
               f"|effect| > {shown:.3f}")
    tokens = [model.tokenizer.decode(int(t)) for t in batch["clean_ids"][0]]
    write_circuit_tracer_graph(graph, out / "circuit.json", tokens)
    _plot_curve(curve, out / "faithfulness.png")
    results = {"case": args.case, "pairs": len(pairs), "layers": layers,
               "metric": graph.metric, "seconds": {"saes": trained, "nodes": nodes_seconds,
                                                   "faithfulness": curve_seconds,
                                                   "edges": edges_seconds},
               "curve": [vars(point) for point in curve],
               "graph": {"nodes": len(graph.nodes), "links": len(graph.links),
                         "threshold": shown}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"graph: {len(graph.nodes)} nodes, {len(graph.links)} edges -> {out / 'circuit.png'}, "
          f"{out / 'circuit.json'}; edges in {edges_seconds:.1f} s")


def _plot_curve(curve, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    sizes = [point.nodes + point.error_nodes for point in curve]
    axes.plot(sizes, [p.faithfulness for p in curve], "o-", label="faithfulness (circuit)")
    axes.plot(sizes, [p.completeness for p in curve], "s-", label="completeness (complement)")
    axes.set_xscale("log")
    axes.set_xlabel("nodes in the circuit")
    axes.axhline(1, color="grey", linewidth=0.5)
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()

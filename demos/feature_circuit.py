"""A sparse feature circuit for subject-verb agreement in SmolLM2 (Marks et al. 2024), on CPU: SAEs
on the residual stream of a few layers (trained here from one collection pass, or read back), the
node effects of every feature and error node by integrated gradients on clean / patch prompt pairs
("The author" -> " is" / "The authors" -> " are"), the edges between consecutive sites, the
circuit's faithfulness and completeness at a few thresholds by real mean ablations, and the graph.

    python demos/feature_circuit.py                        # SmolLM2-135M, resid of 6 layers
    python demos/feature_circuit.py --layers 3,9 --steps 30 --pairs 8    # a quick check
    python demos/feature_circuit.py --suite runs/demo_scae/suite  # an SCAE suite from demos/scae.py

With --suite, the circuit is that of the suite's replacement model (every attention output and MLP
output its module's reconstruction: no error nodes), drawn with the exact edges of the suite's
connections; results.json and the printout compare them with the attribution edges
(`circuits.scae`). It is written to OUT/scae/.

The prompts need a tokenizer in which " is" / " are" are single tokens (SmolLM2's; the tiny test
models' byte tokenizer is not one).

Writes runs/feature_circuit/: the SAEs (sae/trainer_*), then what `python -m dictionary_learning
circuit` writes over them (reports.circuit_report): circuit.png, circuit.svg, circuit.json
(circuit-tracer's graph format), faithfulness.png and results.json.
"""

import argparse
import time
from pathlib import Path

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.models import d_model, n_layers
from dictionary_learning.reports import circuit_report
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE


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
    p.add_argument("--suite", default=None,
                   help="a saved SCAE suite (demos/scae.py writes runs/demo_scae/suite): its "
                   "circuit instead of SAEs trained here")
    p.add_argument("--out", default="runs/feature_circuit", help="(default %(default)s)")
    return p


def train_saes(model, layers: list[int], args) -> list[Path]:
    """One TopK SAE per residual layer, trained from one collection pass (kept when saved)."""
    folder = Path(args.out) / "sae"
    folders = [folder / f"trainer_{i}" for i in range(len(layers))]
    if all((f / "config.json").exists() for f in folders):
        return folders
    points = {f"resid_{layer}": hook(model, layer, "resid") for layer in layers}
    width = d_model(model)
    buffer = ActivationBuffer(default_corpus(repeat=True), model, points, n_ctxs=128, ctx_len=128,
                              refresh_batch_size=32, out_batch_size=args.batch, remove_bos=True,
                              max_activation_norm_multiple=10)
    configs = [dict(trainer=TopKTrainer, activation_dim=width, dict_size=4 * width, k=32, lr=1e-3,
                    steps=args.steps, warmup_steps=max(1, args.steps // 10), seed=0, layer=layer,
                    lm_name=args.model, submodule_name=name)
               for name, layer in zip(points, layers)]
    trainSAE(buffer, configs, args.steps, save_dir=folder, normalize_activations="d_model",
             log_steps=max(1, args.steps // 5))
    return folders


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.suite:
        circuit_report(suite=args.suite, model=args.model, case=args.case, pairs=args.pairs,
                       steps=args.ig_steps, out=Path(args.out) / "scae")
        return
    model = load_model(args.model)
    layers = ([int(x) for x in args.layers.split(",")] if args.layers else
              sorted({round(i * (n_layers(model) - 1) / 5) for i in range(6)}))
    started = time.perf_counter()
    folders = train_saes(model, layers, args)
    print(f"SAEs at the residual stream of layers {layers}: {time.perf_counter() - started:.0f} s")
    del model
    # the circuit command's pipeline, in float32 (gradients of a bfloat16 model are too coarse)
    circuit_report([str(f) for f in folders], model=args.model, case=args.case, pairs=args.pairs,
                   steps=args.ig_steps, out=args.out)


if __name__ == "__main__":
    main()

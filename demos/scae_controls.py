"""The controls of SCAE fine-tuning on SmolLM2: CE against C for selected connections against
random ones, and fine-tuning with the reference fork's linear learning-rate decay against a flat
learning rate.

For each C, from the same trained modules (the suite demos/scae.py writes):
- before fine-tuning: the suite pruned to its C strongest connections, and to C random ones
  (random_connections);
- after fine-tuning at that C for the same steps on the same texts (train_scae_suite, default
  size-scaled lr, local MSE + downstream CE): selected connections with decay from 80% of the steps
  (the default), selected with a flat lr (decay_start=None), and random connections with decay.

    python demos/scae.py              # trains the modules into runs/demo_scae/modules/suite
    python demos/scae_controls.py     # then this: 3 Cs x 3 variants = 9 fine-tunes
    python demos/scae_controls.py --Cs 16 --finetune-steps 120 --variants decay,flat   # longer

Each default fine-tune took about 6 minutes on a 2-core AMD EPYC shared with other runs (README,
2026-12-02). Writes runs/scae_controls/: ce_versus_c.png, ce_versus_c.md and results.json.
"""

import argparse
import itertools
import json
import time
from pathlib import Path

from dictionary_learning import default_corpus, load_model
from dictionary_learning.files import atomic_write
from dictionary_learning.scae import (
    SCAESuite,
    ce_versus_c,
    evaluate_suite,
    plot_ce_versus_c,
    random_connections,
    select_connections,
    train_scae_suite,
)

VARIANTS = ("decay", "flat", "random")


def parser() -> argparse.ArgumentParser:
    """The demo's options; the defaults are the settings of the README's figures."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="runs/demo_scae/modules/suite",
                   help="the trained modules, an SCAESuite folder (default %(default)s)")
    p.add_argument("--model", default=None,
                   help="the suite's model (default: the model_name it was saved with, else "
                   "smollm2-135m)")
    p.add_argument("--Cs", default="4,16,64",
                   help="comma-separated connections per feature (default %(default)s)")
    p.add_argument("--finetune-steps", type=int, default=30,
                   help="fine-tuning steps per C and variant (default %(default)s)")
    p.add_argument("--batch-texts", type=int, default=4,
                   help="texts per fine-tuning step (default %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 2e-4 / sqrt(d_sae / 2^14) per module")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random connections (default %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="which fine-tunings to run: decay (selected connections), flat "
                   "(selected, no decay), random (default %(default)s)")
    p.add_argument("--out", default="runs/scae_controls",
                   help="output folder (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = Path(args.out)
    Cs = [int(C) for C in args.Cs.split(",")]

    suite = SCAESuite.load(args.suite)
    model_name = args.model or suite.model_name or "smollm2-135m"
    model = load_model(model_name, attn_implementation="eager")  # eager: attention patterns
    held_out = list(itertools.islice(default_corpus(), 48))  # as demos/scae.py: 24 + 24 texts
    selection_texts, eval_texts = held_out[:24], held_out[24:]
    selected = select_connections(suite, model, selection_texts, max(Cs))
    drawn = random_connections(suite, max(Cs), seed=args.seed, model=model)
    curves = {
        "selected, before fine-tuning": ce_versus_c(suite, model, None, eval_texts, Cs,
                                                    connections=selected),
        "random, before fine-tuning": ce_versus_c(suite, model, None, eval_texts, Cs,
                                                  connections=drawn),
    }
    print(json.dumps({label: [r["ce_pruned"] for r in rows] for label, rows in curves.items()}),
          flush=True)

    variants = {"decay": ("selected, fine-tuned with decay", selected, 0.8),
                "flat": ("selected, fine-tuned with a flat lr", selected, None),
                "random": ("random, fine-tuned with decay", drawn, 0.8)}
    variants = {variants[v][0]: variants[v][1:] for v in args.variants.split(",")}
    seconds = {}
    for label, (connections, decay_start) in variants.items():
        curves[label] = []
        for C in Cs:
            started = time.perf_counter()
            tuned = SCAESuite.load(args.suite)  # every fine-tune: the same modules and texts
            texts = itertools.islice(default_corpus(repeat=True), 48, None)
            train_scae_suite(tuned, model, texts, connections.top(C), steps=args.finetune_steps,
                             batch_texts=args.batch_texts, lr=args.lr, decay_start=decay_start,
                             progress=False)
            figures = evaluate_suite(tuned, model, eval_texts, tuned.connections)
            curves[label].append({"C": C, **figures})
            seconds[f"{label}, C = {C}"] = time.perf_counter() - started
            print(f"{label}, C = {C}: CE {curves[label][-1]['ce_pruned']:.4f} "
                  f"({seconds[f'{label}, C = {C}']:.0f} s)", flush=True)

    first = curves["selected, before fine-tuning"]
    lines = ["| C | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for i, C in enumerate(Cs):
        cells = " | ".join(f"{rows[i]['ce_pruned']:.3f}" for rows in curves.values())
        lines.append(f"| {C} | {cells} |")
    table = "\n".join(lines) + (f"\n\nclean model {first[0]['ce_clean']:.3f}, dense suite "
                                f"{first[0]['ce_dense']:.3f} (next-token CE, nats, "
                                f"{len(eval_texts)} held-out texts)\n")
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    plot_ce_versus_c(curves, out / "ce_versus_c.png")
    atomic_write(out / "ce_versus_c.md", lambda tmp: Path(tmp).write_text(table))
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"args": vars(args), "seconds": seconds, "curves": curves}, indent=2, default=float)))
    print(f"written to {out}/")


if __name__ == "__main__":
    main()

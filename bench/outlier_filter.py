"""The quickstart trained with and without the outlier-norm filter, judged on the same held-out
tokens.

    python bench/outlier_filter.py [--multiples 10,off] [--loss-batches 16] [--eval-texts 300]
        [--tokens 150000 --steps 600] [--out bench/results/outlier_filter]

Each setting runs `quickstart` (its recipe, `max_activation_norm_multiple` set; no dashboard) into
its own folder, recording every training step's loss. Then every SAE is judged on the same
`--loss-batches` batches of 16 held-out texts (the first `--eval-texts` texts of the corpus, which
no run trains on): per batch, CE with the SAE patched in minus clean CE (dCE, nats) and KL(clean ||
patched), so the settings are compared batch by batch (paired differences, with their standard
error). FVU on all held-out tokens and on the typical ones (norm <= 10x the median) is the
quickstart's own. "Worst spike": the largest step loss over the median of the 50 steps before it
(from step 50 on). Each context's first token (the attention sink, which the quickstart drops) is
left unpatched, as the quickstart's own evaluation does. Prints a table; writes `results.json` in
`--out`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path


def record_losses(losses: list[float]):
    """Record the first trainer's loss at every step the training loop logs (the bar's update)."""
    from dictionary_learning.training import logger

    original = logger.Logger.step

    def step(self, bar, trainers, index):
        losses.append(float(trainers[0].last_metrics["loss"]))
        return original(self, bar, trainers, index)

    logger.Logger.step = step
    return lambda: setattr(logger.Logger, "step", original)


def worst_spike(losses: list[float], window: int = 50) -> float:
    """The largest loss over the median of the `window` losses before it."""
    return max((losses[i] / statistics.median(losses[i - window:i])
                for i in range(window, len(losses))), default=float("nan"))


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.fmean(values), error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiples", default="10,off",
                        help="comma-separated max_activation_norm_multiple values (off: none)")
    parser.add_argument("--loss-batches", type=int, default=16)
    parser.add_argument("--eval-texts", type=int, default=300,
                        help="held-out texts (16 per loss batch)")
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="bench/results/outlier_filter")
    parser.add_argument("--reuse", action="store_true",
                        help="judge the SAEs already in --out instead of training them again")
    args = parser.parse_args()
    if args.loss_batches * 16 > args.eval_texts:
        parser.error(f"--loss-batches {args.loss_batches} needs --eval-texts >= "
                     f"{args.loss_batches * 16}")

    from dictionary_learning import hook, load_model
    from dictionary_learning.data import text_source
    from dictionary_learning.evaluation import patched_losses
    from dictionary_learning.models import dtype_from_name
    from dictionary_learning.reports import quickstart
    from dictionary_learning.tracing import token_mask
    from dictionary_learning.utils import load_dictionary

    out = Path(args.out)
    runs = {}
    for text in args.multiples.split(","):
        folder = out / text
        if args.reuse and (folder / "metrics.json").exists():
            losses_file = folder / "losses.json"
            runs[text] = {"metrics": json.loads((folder / "metrics.json").read_text()),
                          "losses": json.loads(losses_file.read_text())
                          if losses_file.exists() else []}
            continue
        multiple = None if text == "off" else float(text)
        losses: list[float] = []
        restore = record_losses(losses)
        try:
            metrics = quickstart(tokens=args.tokens, steps=args.steps, eval_texts=args.eval_texts,
                                 loss_batches=1, dashboard_features=0, n_features=0,
                                 max_activation_norm_multiple=multiple, out=folder)
        finally:
            restore()
        (folder / "losses.json").write_text(json.dumps(losses))
        runs[text] = {"metrics": metrics, "losses": losses}

    first = next(iter(runs.values()))["metrics"]
    # as the quickstart loads it, and its held-out texts
    model = load_model(first["model"], dtype=dtype_from_name("auto", "cpu"))
    point = hook(model, int(first["hook"].split(".")[1]), "resid")
    texts = list(itertools.islice(text_source(None), args.eval_texts))
    saes = {name: load_dictionary(out / name / "sae" / "trainer_0")[0] for name in runs}
    per_batch: dict[str, dict[str, list[float]]] = {name: {"dce": [], "kl": []} for name in runs}
    for b in range(args.loss_batches):
        batch = texts[16 * b: 16 * b + 16]
        for name, sae in saes.items():
            # the quickstart's positions: each context's first token (the sink) left unpatched
            result = patched_losses(batch, model, sae, (point,), ctx_len=first["ctx_len"],
                                    patch_mask_fn=lambda encoding: token_mask(encoding, True),
                                    progress=False)
            per_batch[name]["dce"].append(result["ce_patched"] - result["ce_clean"])
            per_batch[name]["kl"].append(result["kl_patched"])

    names = list(runs)
    print(f"\n{first['model']} {first['hook']}, {args.tokens:,} training tokens, {args.steps} "
          f"steps; judged on {args.loss_batches} batches of 16 held-out texts")
    header = ("setting", "dropped", "their sq. norm", "FVU all", "FVU typical", "dCE (nats)",
              "KL", "worst spike")
    print(" | ".join(header))
    table = {}
    for name in names:
        metrics, losses = runs[name]["metrics"], runs[name]["losses"]
        dce, dce_error = mean_and_error(per_batch[name]["dce"])
        kl, kl_error = mean_and_error(per_batch[name]["kl"])
        row = {"outliers_dropped": metrics.get("training_outliers_dropped"),
               "outliers_square_norm_share": metrics.get("training_outliers_square_norm_share"),
               "fvu_all_tokens": metrics["fvu_all_tokens"],
               "fvu_typical_tokens": metrics["fvu_typical_tokens"],
               "typical_tokens_excluded": metrics["typical_tokens_excluded"],
               "dce": dce, "dce_se": dce_error, "kl": kl, "kl_se": kl_error,
               "worst_spike": worst_spike(losses), "per_batch": per_batch[name]}
        table[name] = row
        print(f"{name} | {row['outliers_dropped']} | {row['outliers_square_norm_share']:.1%} | "
              f"{row['fvu_all_tokens']:.4f} | {row['fvu_typical_tokens']:.4f} | "
              f"{dce:.4f} +- {dce_error:.4f} | {kl:.4f} +- {kl_error:.4f} | "
              f"{row['worst_spike']:.1f}x")
    if len(names) >= 2:
        a, b = names[0], names[1]
        for key in ("dce", "kl"):
            diffs = [x - y for x, y in zip(per_batch[a][key], per_batch[b][key])]
            mean, error = mean_and_error(diffs)
            base = statistics.fmean(per_batch[b][key])
            print(f"{key}: {a} - {b} = {mean:.4f} +- {error:.4f} per batch "
                  f"({mean / base:+.1%} of {b}'s)")
            table[f"{key}_{a}_minus_{b}"] = {"mean": mean, "se": error, "relative": mean / base}
    (out / "results.json").write_text(json.dumps(table, indent=1))
    print(f"written to {out / 'results.json'}")


if __name__ == "__main__":
    main()

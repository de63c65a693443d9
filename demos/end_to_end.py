"""End-to-end against local SAEs on SmolLM2: for each k, a TopK SAE trained on local MSE, and the
same SAE then fine-tuned end to end (KL to the clean next-token distribution, plus a little local
MSE as e2e_sae's "e2e + downstream"), both measured on held-out text by patching them into the
model: CE increase over the clean model, KL(clean || patched) and the local FVU at the same L0
(= k). `--scratch-steps N` adds, at each k, an SAE trained end to end from its random
initialisation for N steps. Prints a markdown table; `--out` also gets it, with the figures as JSON.

    python demos/end_to_end.py                    # layer 3 residual, k in 8,16,32
    python demos/end_to_end.py --ks 16 --local-steps 100 --e2e-steps 40   # quicker, rougher
    python demos/end_to_end.py --model tiny-llama --layer 1 --ks 4 --dict-size 64 --local-steps 5 \\
        --e2e-steps 2 --eval-texts 4                                        # a quick check

The defaults took about 3 minutes of local training and 15 of end-to-end training per k, measured
2026-12-02 on a 2-core AMD EPYC shared with another run (README).
"""

import argparse
import itertools
import json
import time
from pathlib import Path

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.evaluation import patched_losses, reconstruction_metrics
from dictionary_learning.models import d_model
from dictionary_learning.tracing import read_hook_points, token_mask, tokenize
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary


def parser() -> argparse.ArgumentParser:
    """The demo's options; the defaults are the settings of the README's figures."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), tiny-llama, tiny-gpt2, a local folder or a hub id")
    p.add_argument("--layer", type=int, default=3,
                   help="residual stream after this layer (default %(default)s)")
    p.add_argument("--ks", default="8,16,32",
                   help="comma-separated k (= L0) values, one SAE pair each (default %(default)s)")
    p.add_argument("--dict-size", type=int, default=2304,
                   help="features per SAE (default %(default)s)")
    p.add_argument("--local-steps", type=int, default=200,
                   help="local training steps of 1,024 tokens (default %(default)s)")
    p.add_argument("--e2e-steps", type=int, default=60,
                   help="end-to-end fine-tuning steps of --batch-texts texts (default %(default)s)")
    p.add_argument("--batch-texts", type=int, default=8,
                   help="texts per end-to-end step (default %(default)s)")
    p.add_argument("--ctx-len", type=int, default=64, help="tokens per text (default %(default)s)")
    p.add_argument("--local-weight", type=float, default=1.0,
                   help="weight of the local loss (its FVU: normalize_local) in the e2e runs "
                   "(default %(default)s)")
    p.add_argument("--scratch-steps", type=int, default=0,
                   help="also train end to end from scratch for this many steps "
                   "(0, the default: not)")
    p.add_argument("--reuse", action="store_true",
                   help="load the local and e2e SAEs an earlier run saved in --out instead of "
                   "training them again")
    p.add_argument("--eval-texts", type=int, default=64,
                   help="held-out texts (the corpus's first) to measure on (default %(default)s)")
    p.add_argument("--out", default="runs/end_to_end",
                   help="where the SAEs, table.md and results.json go (default %(default)s)")
    return p


def first_token_kept(encoding):
    """The patch mask of training: each context's first token is left unpatched."""
    return token_mask(encoding, remove_bos=True)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = Path(args.out)
    model = load_model(args.model)
    point = hook(model, args.layer, "resid")
    corpus = default_corpus(repeat=True)
    held_out = list(itertools.islice(default_corpus(), args.eval_texts))  # evaluation only
    for _ in range(args.eval_texts):
        next(corpus)

    encoding = tokenize(model.tokenizer, held_out, args.ctx_len)
    held_out_values = read_hook_points(model, encoding, [point])[0][first_token_kept(encoding)]

    def measure(dictionary) -> dict:
        totals = {}
        for start in range(0, len(held_out), 16):
            result = patched_losses(held_out[start:start + 16], model, dictionary, (point,),
                                    ctx_len=args.ctx_len, patch_mask_fn=first_token_kept)
            for key in ("ce_clean", "ce_patched", "kl_patched"):
                totals[key] = totals.get(key, 0.0) + result[key] * result["tokens"]
            totals["tokens"] = totals.get("tokens", 0) + result["tokens"]
        figures = {key: totals[key] / totals["tokens"]
                   for key in ("ce_clean", "ce_patched", "kl_patched")}
        figures["ce_increase"] = figures["ce_patched"] - figures["ce_clean"]
        figures["fvu"] = reconstruction_metrics(dictionary, held_out_values)["fvu"]
        return figures

    def train_end_to_end(config: dict, steps: int, name: str):
        if args.reuse and (out / name / "trainer_0" / "config.json").exists():
            return load_dictionary(out / name / "trainer_0")[0]
        texts = ([next(corpus) for _ in range(args.batch_texts)] for _ in range(steps))
        trainSAE(texts, [{**config, "steps": steps}], steps, save_dir=out / name, progress=True,
                 end_to_end={"model": model, "hooks": (point,), "kl_weight": 1.0,
                             "local_weight": args.local_weight, "ctx_len": args.ctx_len})
        return load_dictionary(out / name / "trainer_0")[0]

    rows = []
    for k in [int(k) for k in args.ks.split(",")]:
        started = time.perf_counter()
        config = dict(trainer=TopKTrainer, activation_dim=d_model(model), dict_size=args.dict_size,
                      k=k, steps=args.local_steps, warmup_steps=max(1, args.local_steps // 10),
                      seed=0, layer=args.layer, lm_name=args.model)
        buffer = ActivationBuffer(corpus, model, point, n_ctxs=128, ctx_len=args.ctx_len,
                                  refresh_batch_size=32, out_batch_size=1024, remove_bos=True,
                                  max_activation_norm_multiple=10)
        local_dir = out / f"local_k{k}"
        if not (args.reuse and (local_dir / "trainer_0" / "config.json").exists()):
            trainSAE(buffer, [config], args.local_steps, save_dir=local_dir,
                     normalize_activations="d_model", progress=False)
        local, _ = load_dictionary(local_dir / "trainer_0")
        local_seconds = time.perf_counter() - started
        e2e = train_end_to_end({**config, "warmup_steps": 1, "lr": 1e-4,
                                "initial_weights": str(local_dir / "trainer_0")},
                               args.e2e_steps, f"e2e_k{k}")
        row = {"k": k, "local": measure(local), "e2e": measure(e2e), "local_seconds": local_seconds,
               "e2e_seconds": time.perf_counter() - started - local_seconds}
        if args.scratch_steps:
            started = time.perf_counter()
            scratch = train_end_to_end({**config, "warmup_steps": max(1, args.scratch_steps // 10),
                                        "lr": 5e-4}, args.scratch_steps, f"scratch_k{k}")
            row.update(scratch=measure(scratch), scratch_seconds=time.perf_counter() - started)
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)

    kinds = ["local", "e2e"] + (["scratch"] if args.scratch_steps else [])
    figures = ("ce_increase", "kl_patched", "fvu")
    names = ("CE increase", "KL", "FVU")
    header = " | ".join(f"{name}, {kind}" for name in names for kind in kinds)
    table = [f"| L0 (k) | {header} |", "|---" * (1 + 3 * len(kinds)) + "|"]
    for row in rows:
        table.append(f"| {row['k']} | " + " | ".join(f"{row[kind][key]:.4f}" for key in figures
                                                      for kind in kinds) + " |")
    print("\n".join(table))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (out / "table.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()

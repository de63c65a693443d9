"""End-to-end against local SAEs on SmolLM2: for each k, a TopK SAE trained on local MSE, and the same SAE then
fine-tuned end to end (KL to the clean next-token distribution, plus a little local MSE as e2e_sae's "e2e +
downstream"), both measured on held-out text by patching them into the model: CE increase over the clean model,
KL(clean || patched) and the local FVU at the same L0 (= k). `--scratch-steps N` adds, at each k, an SAE trained end
to end from its random initialisation for N steps. Prints a markdown table; `--out` also writes it with the figures
as JSON.

    python demos/end_to_end.py                          # layer 3 residual, k in 8,16,32; about an hour on 2 cores
    python demos/end_to_end.py --ks 16 --local-steps 100 --e2e-steps 40   # quicker, rougher
"""

import argparse
import itertools
import json
import time
from pathlib import Path

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.evaluation import loss_recovered, reconstruction_metrics
from dictionary_learning.tracing import read_hook_points, token_mask, tokenize
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--layer", type=int, default=3)
parser.add_argument("--ks", default="8,16,32")
parser.add_argument("--dict-size", type=int, default=2304)
parser.add_argument("--local-steps", type=int, default=200)
parser.add_argument("--e2e-steps", type=int, default=60)
parser.add_argument("--batch-texts", type=int, default=8)
parser.add_argument("--ctx-len", type=int, default=64)
parser.add_argument("--local-weight", type=float, default=1.0,
                    help="weight of the local loss (its FVU: normalize_local) in the e2e runs")
parser.add_argument("--scratch-steps", type=int, default=0, help="also train end to end from scratch (0: not)")
parser.add_argument("--reuse", action="store_true", help="load the local and e2e SAEs an earlier run saved in --out "
                    "instead of training them again")
parser.add_argument("--eval-texts", type=int, default=64)
parser.add_argument("--out", default="runs/end_to_end")
args = parser.parse_args()

out = Path(args.out)
model = load_model("smollm2-135m")
point = hook(model, args.layer, "resid")
corpus = default_corpus(repeat=True)
held_out = list(itertools.islice(default_corpus(), args.eval_texts))  # the corpus's first texts: evaluation only
for _ in range(args.eval_texts):
    next(corpus)


def first_token_kept(encoding):
    return token_mask(encoding, remove_bos=True)


encoding = tokenize(model.tokenizer, held_out, args.ctx_len)
held_out_values = read_hook_points(model, encoding, [point])[0][token_mask(encoding, remove_bos=True)]


def measure(dictionary) -> dict:
    totals = {}
    for start in range(0, len(held_out), 16):
        result = loss_recovered(held_out[start:start + 16], model, dictionary, (point,), ctx_len=args.ctx_len,
                                patch_mask_fn=first_token_kept)  # as trained: each context's first token unpatched
        for key in ("ce_clean", "ce_patched", "kl_patched"):
            totals[key] = totals.get(key, 0.0) + result[key] * result["tokens"]
        totals["tokens"] = totals.get("tokens", 0) + result["tokens"]
    figures = {key: totals[key] / totals["tokens"] for key in ("ce_clean", "ce_patched", "kl_patched")}
    figures["ce_increase"] = figures["ce_patched"] - figures["ce_clean"]
    figures["fvu"] = reconstruction_metrics(dictionary, held_out_values)["fvu"]
    return figures


def train_end_to_end(config: dict, steps: int, name: str):
    if args.reuse and (out / name / "trainer_0" / "config.json").exists():
        return load_dictionary(out / name / "trainer_0")[0]
    texts = ([next(corpus) for _ in range(args.batch_texts)] for _ in range(steps))
    trainSAE(texts, [{**config, "steps": steps}], steps, save_dir=out / name, progress=True,
             end_to_end={"model": model, "hooks": (point,), "kl_weight": 1.0, "local_weight": args.local_weight,
                         "ctx_len": args.ctx_len})
    return load_dictionary(out / name / "trainer_0")[0]


rows = []
for k in [int(k) for k in args.ks.split(",")]:
    started = time.perf_counter()
    config = dict(trainer=TopKTrainer, activation_dim=576, dict_size=args.dict_size, k=k, steps=args.local_steps,
                  warmup_steps=max(1, args.local_steps // 10), seed=0, layer=args.layer, lm_name="smollm2-135m")
    buffer = ActivationBuffer(corpus, model, point, n_ctxs=128, ctx_len=args.ctx_len, refresh_batch_size=32,
                              out_batch_size=1024, remove_bos=True)
    if not (args.reuse and (out / f"local_k{k}" / "trainer_0" / "config.json").exists()):
        trainSAE(buffer, [config], args.local_steps, save_dir=out / f"local_k{k}", normalize_activations="d_model",
                 progress=False)
    local, _ = load_dictionary(out / f"local_k{k}" / "trainer_0")
    local_seconds = time.perf_counter() - started
    e2e = train_end_to_end({**config, "warmup_steps": 1, "lr": 1e-4,
                            "initial_weights": str(out / f"local_k{k}" / "trainer_0")}, args.e2e_steps, f"e2e_k{k}")
    row = {"k": k, "local": measure(local), "e2e": measure(e2e), "local_seconds": local_seconds,
           "e2e_seconds": time.perf_counter() - started - local_seconds}
    if args.scratch_steps:
        started = time.perf_counter()
        scratch = train_end_to_end({**config, "warmup_steps": max(1, args.scratch_steps // 10), "lr": 5e-4},
                                   args.scratch_steps, f"scratch_k{k}")
        row.update(scratch=measure(scratch), scratch_seconds=time.perf_counter() - started)
    rows.append(row)
    print(json.dumps(rows[-1]), flush=True)

kinds = ["local", "e2e"] + (["scratch"] if args.scratch_steps else [])
table = ["| L0 (k) | " + " | ".join(f"{figure}, {kind}" for figure in ("CE increase", "KL", "FVU") for kind in kinds)
         + " |", "|---" * (1 + 3 * len(kinds)) + "|"]
for row in rows:
    table.append(f"| {row['k']} | " + " | ".join(f"{row[kind][key]:.4f}" for key in ("ce_increase", "kl_patched", "fvu")
                                                  for kind in kinds) + " |")
print("\n".join(table))
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
(out / "table.md").write_text("\n".join(table) + "\n")

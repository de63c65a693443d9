"""End-to-end against local SAEs on SmolLM2: for each k, a TopK SAE trained on local MSE, and the same SAE then
fine-tuned end to end (KL to the clean next-token distribution, plus a little local MSE as e2e_sae's "e2e +
downstream"), both measured on held-out text by patching them into the model: CE increase over the clean model and
KL(clean || patched) at the same L0 (= k). Prints a markdown table; `--out` also writes it with the figures as JSON.

    python demos/end_to_end.py                          # layer 3 residual, k in 8,16,32; about 40 minutes on 2 cores
    python demos/end_to_end.py --ks 16 --local-steps 100 --e2e-steps 40   # quicker, rougher
"""

import argparse
import itertools
import json
import time
from pathlib import Path

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.evaluation import loss_recovered
from dictionary_learning.tracing import token_mask
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--layer", type=int, default=3)
parser.add_argument("--ks", default="8,16,32")
parser.add_argument("--dict-size", type=int, default=2304)
parser.add_argument("--local-steps", type=int, default=300)
parser.add_argument("--e2e-steps", type=int, default=100)
parser.add_argument("--batch-texts", type=int, default=8)
parser.add_argument("--ctx-len", type=int, default=64)
parser.add_argument("--local-weight", type=float, default=0.1, help="weight of the local loss in the e2e run")
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
    return figures


rows = []
for k in [int(k) for k in args.ks.split(",")]:
    started = time.perf_counter()
    config = dict(trainer=TopKTrainer, activation_dim=576, dict_size=args.dict_size, k=k, steps=args.local_steps,
                  warmup_steps=max(1, args.local_steps // 10), seed=0, layer=args.layer, lm_name="smollm2-135m")
    buffer = ActivationBuffer(corpus, model, point, n_ctxs=128, ctx_len=args.ctx_len, refresh_batch_size=32,
                              out_batch_size=1024, remove_bos=True)
    trainSAE(buffer, [config], args.local_steps, save_dir=out / f"local_k{k}", normalize_activations="d_model",
             progress=False)
    local, _ = load_dictionary(out / f"local_k{k}" / "trainer_0")
    local_seconds = time.perf_counter() - started
    texts = ([next(corpus) for _ in range(args.batch_texts)] for _ in range(args.e2e_steps))
    e2e_config = {**config, "steps": args.e2e_steps, "warmup_steps": 1, "lr": 1e-4,
                  "initial_weights": str(out / f"local_k{k}" / "trainer_0")}
    trainSAE(texts, [e2e_config], args.e2e_steps, save_dir=out / f"e2e_k{k}", progress=True,
             end_to_end={"model": model, "hooks": (point,), "kl_weight": 1.0, "local_weight": args.local_weight,
                         "ctx_len": args.ctx_len})
    e2e, _ = load_dictionary(out / f"e2e_k{k}" / "trainer_0")
    rows.append({"k": k, "local": measure(local), "e2e": measure(e2e), "local_seconds": local_seconds,
                 "e2e_seconds": time.perf_counter() - started - local_seconds})
    print(json.dumps(rows[-1]), flush=True)

table = ["| L0 (k) | CE increase, local | CE increase, e2e | KL, local | KL, e2e |", "|---|---|---|---|---|"]
for row in rows:
    table.append(f"| {row['k']} | {row['local']['ce_increase']:.4f} | {row['e2e']['ce_increase']:.4f} | "
                 f"{row['local']['kl_patched']:.4f} | {row['e2e']['kl_patched']:.4f} |")
print("\n".join(table))
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
(out / "table.md").write_text("\n".join(table) + "\n")

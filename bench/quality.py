"""Same-batches quality against sparsify: one cached activation set and one batch order, read by
this toolkit's TopK trainer (the quickstart's recipe) and by sparsify's trainer (its default
ScheduleFree SignSGD, and Adam), every SAE judged by this toolkit's one code path.

    python bench/quality.py [--tokens 150000 --steps 600 --batch 2048] [--peers signum,adam]
        [--loss-batches 16] [--out bench/results/quality]

1. SmolLM2 layer 15 residual, the quickstart's way (ctx 128, first token dropped, tokens above 10x
   their batch's median dropped), `--tokens` from the texts after the first `--eval-texts`; one
   batch order (`--steps` x `--batch`, a permutation per epoch); saved in `--out` (reused when
   there).
2. Ours: `TopKTrainer` with the quickstart's settings on those batches. Peers: `bench/peer_train.py`
   in sparsify's venv (`bench/setup_peers.sh`) on the same file: its defaults (signum), and Adam
   with 10% warmup and AuxK 1/32; their saves are read through `formats`.
3. Judged alike: FVU on 8,192 held-out tokens (all of them, and without the ones above 10x their
   batch's median), L0, dead latents (never firing there), and on `--loss-batches` batches of 16
   held-out texts the CE the SAE adds (dCE) and KL(clean || patched), each context's first token
   unpatched; mean +- standard error over the batches. Prints a table; writes `results.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PEER_PYTHON = Path.home() / ".cache/dictionary_learning/peers/eai-sparsify/bin/python"


def mean_and_error(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--peers", default="signum,adam",
                        help="sparsify optimizers to train (empty: none)")
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    parser.add_argument("--eval-texts", type=int, default=300)
    parser.add_argument("--loss-batches", type=int, default=16)
    parser.add_argument("--out", default="bench/results/quality")
    args = parser.parse_args()

    from safetensors.torch import load_file, save_file

    from dictionary_learning import ActivationBuffer, hook, load_dictionary, load_model
    from dictionary_learning.data import text_source
    from dictionary_learning.evaluation import evaluate, patched_losses
    from dictionary_learning.formats import load as load_format
    from dictionary_learning.models import dtype_from_name
    from dictionary_learning.tracing import token_mask
    from dictionary_learning.trainers import TopKTrainer
    from dictionary_learning.training import trainSAE

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("smollm2-135m", dtype=dtype_from_name("auto", "cpu"))
    point = hook(model, 15, "resid")
    texts = text_source(None, repeat=True)
    held_out = list(itertools.islice(texts, args.eval_texts))
    data = out / "activations.safetensors"
    settings = dict(ctx_len=128, refresh_batch_size=32, dtype=torch.float32, remove_bos=True)
    if data.exists():
        stored = load_file(data)
        activations, order = stored["activations"], stored["order"]
    else:
        buffer = ActivationBuffer(texts, model, point, n_ctxs=256, out_batch_size=4096,
                                  max_activation_norm_multiple=10, **settings)
        activations = buffer.take(args.tokens)
        print(f"filter: {buffer.filtered.line()}", file=sys.stderr)
        generator = torch.Generator().manual_seed(0)
        per_epoch = activations.shape[0] // args.batch
        epochs = -(-args.steps // per_epoch)
        order = torch.cat([torch.randperm(activations.shape[0], generator=generator)
                           [:per_epoch * args.batch].view(per_epoch, args.batch)
                           for _ in range(epochs)])[:args.steps]
        save_file({"activations": activations.contiguous(), "order": order.contiguous()}, data)

    saes = {}
    ours = out / "ours" / "trainer_0"
    if not (ours / "config.json").exists():
        trainer = dict(trainer=TopKTrainer, activation_dim=activations.shape[1],
                       dict_size=args.d_sae, k=args.k, lr=1e-3, steps=args.steps,
                       warmup_steps=min(100, args.steps // 10), decay_start=int(args.steps * 0.8),
                       dead_feature_threshold=200_000, seed=0, layer=15, lm_name="smollm2-135m",
                       submodule_name=str(point), encoder_dtype="auto")
        # the scale is estimated on the first 8 batches, read once more: training then sees
        # exactly the peers' batches
        batches = itertools.chain(order[:8], order)
        trainSAE((activations[rows] for rows in batches), [trainer], args.steps,
                 save_dir=out / "ours", normalize_activations="d_model", normalization_batches=8,
                 progress=False)
    saes["this toolkit (TopK, quickstart recipe)"] = load_dictionary(ours)[0]
    for optimizer in filter(None, args.peers.split(",")):
        folder = out / f"sparsify_{optimizer}"
        if not (folder / "layers" / "cfg.json").exists():
            # Adam as a user would set it for a run this short: 10% warmup (its default, 1,000
            # steps, is longer than the run) and AuxK at 1/32 (its default: none)
            adam = (["--warmup-steps", str(max(1, args.steps // 10)), "--auxk-alpha", "0.03125"]
                    if optimizer == "adam" else [])
            done = subprocess.run([args.peer_python, str(HERE / "peer_train.py"), "--data",
                                   str(out), "--optimizer", optimizer, "--out", str(folder),
                                   "--num-latents", str(args.d_sae), "--k", str(args.k), *adam],
                                  capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"sparsify ({optimizer}) failed:\n{done.stderr[-3000:]}")
            print(done.stdout.strip(), file=sys.stderr)
        saes[f"sparsify 1.3.3 ({optimizer})"] = load_format(folder / "layers", "sparsify",
                                                            model_name="smollm2-135m")[0]

    eval_buffer = ActivationBuffer(iter(held_out), model, point, n_ctxs=64, out_batch_size=2048,
                                   **settings)
    held_out_rows = eval_buffer.take(8192).split(2048)
    results = {}
    for name, sae in saes.items():
        metrics = evaluate(sae, iter(held_out_rows), n_batches=len(held_out_rows), progress=False)
        dce, kl = [], []
        for b in range(args.loss_batches):
            losses = patched_losses(held_out[16 * b: 16 * b + 16], model, sae, (point,), 128,
                                    patch_mask_fn=lambda encoding: token_mask(encoding, True),
                                    progress=False)
            dce.append(losses["ce_patched"] - losses["ce_clean"])
            kl.append(losses["kl_patched"])
        results[name] = {"fvu_all_tokens": metrics["fvu_all_tokens"],
                         "fvu_typical_tokens": metrics["fvu_typical_tokens"],
                         "l0": metrics["l0"], "dead": 1 - metrics["frac_alive"],
                         "dce": mean_and_error(dce), "kl": mean_and_error(kl),
                         "per_batch_dce": dce}
    print(f"\nSmolLM2 {point}, {activations.shape[0]:,} collected tokens, {args.steps} steps x "
          f"{args.batch} (the same batches for all), {args.d_sae} latents, k {args.k}; judged on "
          f"8,192 held-out tokens and {args.loss_batches} batches of 16 held-out texts")
    print("| trainer | FVU all | FVU typical | L0 | dead | dCE (nats) | KL |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['fvu_all_tokens']:.4f} | {r['fvu_typical_tokens']:.4f} | "
              f"{r['l0']:.1f} | {r['dead']:.1%} | {r['dce'][0]:.4f} +- {r['dce'][1]:.4f} | "
              f"{r['kl'][0]:.4f} +- {r['kl'][1]:.4f} |")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"written to {out / 'results.json'}")


if __name__ == "__main__":
    main()

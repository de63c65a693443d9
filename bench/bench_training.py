"""TopK SAE training throughput: our TopKTrainer (float32, and with its encoder GEMM in bfloat16
where `encoder_dtype="auto"` picks it) against the PyPI packages dictionary-learning (Marks),
sae-lens and eai-sparsify, each in its own venv (bench/setup_peers.sh builds them), on the same
shapes and synthetic activations, measured in one run.

    bash bench/setup_peers.sh        # once: venvs under ~/.cache/dictionary_learning/peers
    python bench/bench_training.py [--d-in 576 --dict-size 4608 --k 32 --batch 4096 --steps 20]

Each side times `--steps` full training steps (forward, loss with AuxK, backward, optimizer step,
decoder renormalisation) after `--warmup` untimed ones, with no dead latents and with 10% dead
(AuxK active).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEERS, run_peer  # noqa: E402

from dictionary_learning.trainers import TopKTrainer  # noqa: E402
from dictionary_learning.trainers.top_k import resolve_encoder_dtype  # noqa: E402


def ours(d_in, dict_size, k, batch, steps, warmup, dead_fraction, seed=0,
         encoder_dtype=None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pool = [torch.randn(batch, d_in, generator=generator) for _ in range(4)]
    trainer = TopKTrainer(steps=10_000, activation_dim=d_in, dict_size=dict_size, k=k,
                          warmup_steps=10, seed=seed, encoder_dtype=encoder_dtype)
    trainer.update(0, pool[0])  # step 0 initialises b_dec
    n_dead = round(dead_fraction * dict_size)
    if n_dead:
        dead = torch.randperm(dict_size, generator=generator)[:n_dead]
        # really dead: a bias far below any pre-activation; and counted as dead
        with torch.no_grad():
            trainer.ae.encoder.bias[dead] = -1e4
        trainer.num_tokens_since_fired[dead] = trainer.dead_feature_threshold
    for step in range(1, warmup + 1):
        trainer.update(step, pool[step % len(pool)])
    start = time.perf_counter()
    for step in range(warmup + 1, warmup + 1 + steps):
        trainer.update(step, pool[step % len(pool)])
    seconds = (time.perf_counter() - start) / steps
    label = ("ours" if trainer.encoder_dtype is None
             else f"ours, {str(trainer.encoder_dtype)[6:]} encoder GEMM")
    return {"peer": label, "tokens_per_s": batch / seconds, "step_ms": 1000 * seconds,
            "dead": trainer.dead_features}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--dict-size", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dead-fractions", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = dict(d_in=args.d_in, dict_size=args.dict_size, k=args.k, batch=args.batch,
                 steps=args.steps, warmup=args.warmup)
    print(f"TopK training step, d_in {args.d_in}, dict_size {args.dict_size}, k {args.k}, batch "
          f"{args.batch}, float32, {args.threads} threads, {args.steps} timed steps")
    fast = resolve_encoder_dtype("auto", torch.device("cpu"))
    print(f"encoder_dtype='auto' here: {fast or 'float32 (no fast bfloat16 on this CPU)'}")
    for dead_fraction in args.dead_fractions:
        mine = [ours(dead_fraction=dead_fraction, **shape)]
        # the dense encoder GEMM in bfloat16 (what "auto" picks here), all else float32
        if fast is not None:
            mine.append(ours(dead_fraction=dead_fraction, encoder_dtype=fast, **shape))
        peers = [run_peer(name, dead_fraction=dead_fraction, threads=args.threads, **shape)
                 for name in PEERS]
        gemm_ms = next((r["reference_gemm_ms"] for r in peers if "reference_gemm_ms" in r), None)
        print(f"\n{dead_fraction:.0%} dead latents:")
        for result in mine + peers:
            label = f"{result['peer']} {result.get('version', '')}".strip()
            if "error" in result:
                print(f"  {label:36s} failed: {result['error'][:200]}")
            else:
                print(f"  {label:36s} {result['tokens_per_s']:9.0f} tokens/s  "
                      f"({result['step_ms']:.0f} ms/step)")
        if gemm_ms:
            print(f"  one float32 encoder GEMM: {gemm_ms:.0f} ms = "
                  f"{args.batch / gemm_ms * 1000:.0f} tokens/s (the floor of a float32 step)")
        peers_ok = [r for r in peers if "error" not in r]
        for own in mine:
            for result in peers_ok:
                print(f"  {own['peer']} / {result['peer']}: "
                      f"{own['tokens_per_s'] / result['tokens_per_s']:.2f}x")
            if peers_ok:
                fastest = max(peers_ok, key=lambda r: r["tokens_per_s"])
                print(f"  {own['peer']} / fastest peer ({fastest['peer']}): "
                      f"{own['tokens_per_s'] / fastest['tokens_per_s']:.2f}x  (target >= 1.5)")


if __name__ == "__main__":
    main()

"""TopK SAE training throughput: our TopKTrainer against the PyPI packages dictionary-learning (Marks) and
sae-lens, each in its own venv (bench/setup_peers.sh builds them), on the same shapes and synthetic activations,
measured in one run.

    bash bench/setup_peers.sh        # once: venvs under ~/.cache/dictionary_learning/peers
    python bench/bench_training.py [--d-in 576 --dict-size 4608 --k 32 --batch 4096 --steps 20]

Each side times `--steps` full training steps (forward, loss with AuxK, backward, optimizer step, decoder
renormalisation) after `--warmup` untimed ones, with no dead latents and with 10% dead (AuxK active).
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


def ours(d_in, dict_size, k, batch, steps, warmup, dead_fraction, seed=0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pool = [torch.randn(batch, d_in, generator=generator) for _ in range(4)]
    trainer = TopKTrainer(steps=10_000, activation_dim=d_in, dict_size=dict_size, k=k, warmup_steps=10, seed=seed)
    trainer.update(0, pool[0])  # step 0 initialises b_dec
    n_dead = round(dead_fraction * dict_size)
    if n_dead:
        dead = torch.randperm(dict_size, generator=generator)[:n_dead]
        with torch.no_grad():  # really dead: a bias far below any pre-activation; and counted as dead
            trainer.ae.encoder.bias[dead] = -1e4
        trainer.num_tokens_since_fired[dead] = trainer.dead_threshold_tokens
    for step in range(1, warmup + 1):
        trainer.update(step, pool[step % len(pool)])
    start = time.perf_counter()
    for step in range(warmup + 1, warmup + 1 + steps):
        trainer.update(step, pool[step % len(pool)])
    seconds = (time.perf_counter() - start) / steps
    return {"peer": "ours", "tokens_per_s": batch / seconds, "step_ms": 1000 * seconds,
            "dead": trainer.dead_features}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    shape = dict(d_in=args.d_in, dict_size=args.dict_size, k=args.k, batch=args.batch, steps=args.steps,
                 warmup=args.warmup)
    print(f"TopK training step, d_in {args.d_in}, dict_size {args.dict_size}, k {args.k}, batch {args.batch}, "
          f"float32, {args.threads} threads, {args.steps} timed steps")
    for dead_fraction in args.dead_fractions:
        results = [ours(dead_fraction=dead_fraction, **shape)]
        results += [run_peer(name, dead_fraction=dead_fraction, threads=args.threads, **shape) for name in PEERS]
        print(f"\n{dead_fraction:.0%} dead latents:")
        for result in results:
            label = f"{result['peer']} {result.get('version', '')}".strip()
            if "error" in result:
                print(f"  {label:28s} failed: {result['error'][:200]}")
            else:
                print(f"  {label:28s} {result['tokens_per_s']:9.0f} tokens/s  ({result['step_ms']:.0f} ms/step)")
        peers_ok = [r for r in results[1:] if "error" not in r]
        for result in peers_ok:
            print(f"  ours / {result['peer']}: {results[0]['tokens_per_s'] / result['tokens_per_s']:.2f}x")
        if peers_ok:
            fastest = max(peers_ok, key=lambda r: r["tokens_per_s"])
            print(f"  ours / fastest peer ({fastest['peer']}): "
                  f"{results[0]['tokens_per_s'] / fastest['tokens_per_s']:.2f}x  (target >= 1)")


if __name__ == "__main__":
    main()

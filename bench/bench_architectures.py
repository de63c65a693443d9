"""JumpReLU and Matryoshka BatchTopK SAE training throughput: our JumpReluTrainer and
MatryoshkaBatchTopKTrainer against the PyPI packages dictionary-learning (Marks) and sae-lens, each
in its own venv (bench/setup_peers.sh builds them), on the same shapes and synthetic activations,
measured in one run.

    bash bench/setup_peers.sh        # once: venvs under ~/.cache/dictionary_learning/peers
    python bench/bench_architectures.py [--archs jumprelu matryoshka --d-in 576 --dict-size 4608 --k
                                         32 \
        --batch 4096 --steps 20 --dead-fractions 0.0 0.1]
    python bench/bench_architectures.py --d-in 64 --dict-size 512 --batch 256 --steps 3
        # smoke test

Each side times `--steps` full training steps (forward, loss, backward, optimizer step, decoder
renormalisation where the method has one) after `--warmup` untimed ones, in the same timing loop
(bench/peer_arch_step.py's). JumpReLU: target L0 `--target-l0` (default k), every side's thresholds
set from its own pre-activations so that L0 starts at the target. Matryoshka: k per token, groups of
`--group-fractions` of dict_size, once per dead fraction (AuxK runs when latents are dead). Prints
tokens/s per side, ours / each peer and ours / the fastest peer per architecture, then one JSON line
with every figure. On a shared machine, compare CPU ms/step (about threads x ms/step when a side had
its cores) and the JSON's `uncontended_*` figures rather than wall-clock tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_arch_step import (
    ARCHS,
    GROUP_FRACTIONS,
    LONG_RUN_STEPS,
    check_args,
    measured_l0,
    thresholds_for_l0,
    time_steps,
)
from peer_step import POOL_BATCHES, dead_latent_ids, killing_bias, make_pool, reference_gemm_ms
from peers import PEERS, run_peer

from dictionary_learning.trainers import JumpReluTrainer, MatryoshkaBatchTopKTrainer

PEER_ARCH_STEP_SCRIPT = Path(__file__).resolve().with_name("peer_arch_step.py")


def our_version() -> str:
    try:
        return version("dictionary_learning")
    except PackageNotFoundError:
        return "working tree"


def ours(args: argparse.Namespace) -> dict[str, Any]:
    """Time our trainer for `args.arch` on the same pool, dead latents and thresholds rule as the
    peers."""
    result: dict[str, Any] = {"peer": "ours", "arch": args.arch, "version": our_version(),
                              "reference_gemm_ms": reference_gemm_ms(torch, args)}
    pool = make_pool(torch, args)
    dead_ids = dead_latent_ids(torch, args)
    if args.arch == "jumprelu":
        trainer = JumpReluTrainer(steps=LONG_RUN_STEPS, activation_dim=args.d_in,
                                  dict_size=args.dict_size, seed=args.seed,
                                  target_l0=args.target_l0, device="cpu")
        with torch.no_grad():
            _, pre = trainer.ae.encode(pool[0], output_pre_jump=True)  # [batch, dict_size]
            trainer.ae.threshold.copy_(thresholds_for_l0(torch, pre, args.target_l0))

        def encode(x: torch.Tensor) -> torch.Tensor:
            return trainer.ae.encode(x)
    else:
        trainer = MatryoshkaBatchTopKTrainer(
            steps=LONG_RUN_STEPS, activation_dim=args.d_in, dict_size=args.dict_size, k=args.k,
            group_fractions=list(args.group_fractions), threshold_start_step=1, seed=args.seed,
            device="cpu")
        if len(dead_ids):  # as the peers: a bias far below any pre-activation, and counted as dead
            bias = killing_bias(torch, pool, pool[0].mean(0), trainer.ae.W_enc.detach())
            with torch.no_grad():
                trainer.ae.b_enc[dead_ids] = bias
            trainer.num_tokens_since_fired[dead_ids] = trainer.dead_feature_threshold

        # the training codes: the batch's k * batch largest
        def encode(x: torch.Tensor) -> torch.Tensor:
            return trainer.ae.encode(x, use_threshold=False)

    result.update(time_steps(torch, trainer.update, pool, args))
    result.update(dead_latents_requested=len(dead_ids),
                  dead_latents_measured=int(trainer.dead_mask(trainer.dead_feature_threshold).sum()),
                  l0_measured=measured_l0(torch, encode, pool[1 % POOL_BATCHES]))
    if "sparse_step" in trainer.last_metrics:
        result["sparse_step"] = bool(trainer.last_metrics["sparse_step"])
    return result


def peer(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time the peer `name` for `args.arch` in its own venv (bench/peer_arch_step.py)."""
    extra = ["--arch", args.arch, "--target-l0", str(args.target_l0), "--scale", str(args.scale),
             "--group-fractions", *map(str, args.group_fractions)]
    result = run_peer(name, d_in=args.d_in, dict_size=args.dict_size, k=args.k, batch=args.batch,
                      steps=args.steps, warmup=args.warmup, dead_fraction=args.dead_fraction,
                      seed=args.seed, threads=args.threads, extra_args=tuple(extra),
                      script=PEER_ARCH_STEP_SCRIPT)
    return {"arch": args.arch, **result}


def ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """ours / each peer that ran, and ours / the fastest of them (tokens/s)."""
    ours_speed = results[0].get("tokens_per_s")
    peers_ok = [r for r in results[1:] if "error" not in r and r.get("tokens_per_s")]
    if not ours_speed or not peers_ok:
        return {}
    fastest = max(peers_ok, key=lambda r: r["tokens_per_s"])
    figures = {f"ours/{r['peer']}": round(ours_speed / r["tokens_per_s"], 3) for r in peers_ok}
    figures["fastest_peer"] = fastest["peer"]
    figures["ours/fastest_peer"] = round(ours_speed / fastest["tokens_per_s"], 3)
    return figures


def print_case(title: str, results: list[dict[str, Any]], figures: dict[str, Any]) -> None:
    print(f"\n{title}:")
    for result in results:
        label = f"{result['peer']} {result.get('version', '')}".strip()
        if "error" in result:
            print(f"  {label:28s} failed: {result['error'][:200]}")
            continue
        notes = f"L0 {result['l0_measured']}"
        if result.get("dead_latents_requested"):
            notes += f", dead {result['dead_latents_measured']}/{result['dead_latents_requested']}"
        if "sparse_step" in result:
            notes += ", sparse step" if result["sparse_step"] else ", dense step"
        print(f"  {label:28s} {result['tokens_per_s']:9.0f} tokens/s  ({result['step_ms']:.0f} "
              f"ms/step, {result['cpu_ms_per_step']:.0f} CPU ms/step, {notes})")
    for key, value in figures.items():
        if key.startswith("ours/") and key != "ours/fastest_peer":
            print(f"  {key.replace('/', ' / ')}: {value:.2f}x")
    if figures:
        print(f"  ours / fastest peer ({figures['fastest_peer']}): "
              f"{figures['ours/fastest_peer']:.2f}x  (target >= 1)")
    else:
        print("  no ratio: ours or every peer failed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--dict-size", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32,
                        help="Matryoshka k per token (and JumpReLU's default target L0)")
    parser.add_argument("--target-l0", type=float, default=None,
                        help="JumpReLU target L0 (default: --k)")
    parser.add_argument("--group-fractions", type=float, nargs="+", default=list(GROUP_FRACTIONS))
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dead-fractions", type=float, nargs="+", default=[0.0, 0.1],
                        help="Matryoshka only: fractions of latents made dead (AuxK active)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="activations are scale * randn")
    args = parser.parse_args(argv)
    if args.target_l0 is None:
        args.target_l0 = float(args.k)
    for case in cases(args):
        problem = check_args(case)
        if problem:
            parser.error(problem)
    return args


def cases(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One shape per (architecture, dead fraction) to measure: JumpReLU once, Matryoshka per dead
    fraction."""
    shapes = []
    for arch in args.archs:
        for dead_fraction in ([0.0] if arch == "jumprelu" else args.dead_fractions):
            shapes.append(argparse.Namespace(**{**vars(args), "arch": arch,
                                                "dead_fraction": dead_fraction}))
    return shapes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    print(f"JumpReLU / Matryoshka BatchTopK training step, d_in {args.d_in}, dict_size "
          f"{args.dict_size}, batch {args.batch}, JumpReLU target L0 {args.target_l0:g}, "
          f"Matryoshka k {args.k} with groups {[round(f, 4) for f in args.group_fractions]}, "
          f"float32, {args.threads} threads, {args.steps} timed steps")
    start = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "architectures", "d_in": args.d_in,
                              "dict_size": args.dict_size, "batch": args.batch, "k": args.k,
                              "target_l0": args.target_l0, "group_fractions": args.group_fractions,
                              "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                              "seed": args.seed,
                              "cases": []}
    for case in cases(args):
        results = [ours(case)] + [peer(name, case) for name in PEERS]
        figures = ratios(results)
        if case.arch == "jumprelu":
            title = "JumpReLU"
        else:
            title = f"Matryoshka BatchTopK, {case.dead_fraction:.0%} dead latents"
        print_case(title, results, figures)
        report["cases"].append({"arch": case.arch, "dead_fraction": case.dead_fraction,
                                "results": results, "ratios": figures})
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print()
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""A TopK training step at the sizes people train, against eai-sparsify (and sae-lens with
`--peers`), each side in a fresh process, alternating, with two floors measured in the same run: one
float32 encoder GEMM, and that GEMM plus one optimizer step over the dictionary's parameters (fused
Adam, the fastest torch has here).

    bash bench/setup_peers.sh eai-sparsify         # once
    python bench/bench_scale.py                     # the grid below, no dead latents and 10% dead
    python bench/bench_scale.py --architectures     # BatchTopK, Matryoshka, a transcoder at 16,384
    python bench/bench_scale.py --quick             # toy sizes: checks that everything runs

Every side steps on the same synthetic float32 activations (`bench/peer_step.py`'s pools; dead
latents made really dead and counted as dead, so AuxK runs every step). A side's figure is the
median over its timed steps, the smaller of `--rounds` rounds. Prints a table (the README's
performance section shows the latest) and writes JSON (`--json`). Both sides run with PyTorch's
2 MB pages for large tensors (THP_MEM_ALLOC_ENABLE=1, what importing this package sets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from peer_arch_step import GROUP_FRACTIONS  # noqa: E402 (the peers' Matryoshka groups)
from peers import run_peer  # noqa: E402

# (d_in, latents, k, batch): the grid
GRID = [(576, 4608, 32, 4096), (576, 18432, 32, 4096), (576, 73728, 32, 1024),
        (2048, 16384, 64, 1024), (2048, 65536, 64, 1024)]
QUICK = [(64, 512, 8, 256)]
ARCHITECTURES = ("batchtopk", "matryoshka", "transcoder")
# the nearest peer step per architecture: (peer, script, extra arguments)
ARCH_PEERS = {"topk": ("eai-sparsify", "peer_step.py", ()),
              "transcoder": ("eai-sparsify", "peer_step.py", ("--transcoder",)),
              "matryoshka": ("sae-lens", "peer_arch_step.py", ("--arch", "matryoshka"))}


def worker(args: argparse.Namespace) -> None:
    """One side's figures in this process: our trainer's step, then the two floors."""
    import torch

    import dictionary_learning  # noqa: F401 (first, as a user's script would: 2 MB pages)
    from dictionary_learning.trainers import (
        BatchTopKTrainer,
        MatryoshkaBatchTopKTrainer,
        TopKTrainer,
    )
    from dictionary_learning.trainers.optim import adam

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    pool = [torch.randn(args.batch, args.d_in, generator=generator).to(args.device)
            for _ in range(4)]
    targets = [torch.randn(args.batch, args.d_in, generator=generator).to(args.device)
               for _ in range(4)]

    def sync() -> None:  # CUDA runs asynchronously: time finished work
        if pool[0].is_cuda:
            torch.cuda.synchronize()

    cls = {"topk": TopKTrainer, "batchtopk": BatchTopKTrainer, "transcoder": TopKTrainer,
           "matryoshka": MatryoshkaBatchTopKTrainer}[args.arch]
    options = {"transcoder": {"transcoder": True},
               "matryoshka": {"group_fractions": list(GROUP_FRACTIONS)}}.get(args.arch, {})
    if args.encoder_dtype:
        options["encoder_dtype"] = args.encoder_dtype
    trainer = cls(steps=100_000, activation_dim=args.d_in, dict_size=args.dict_size, k=args.k,
                  warmup_steps=10, seed=args.seed, device=args.device, **options)
    batch = ((lambda i: (pool[i % 4], targets[i % 4])) if args.arch == "transcoder"
             else (lambda i: pool[i % 4]))
    trainer.update(0, batch(0))  # b_dec at the median
    n_dead = round(args.dead_fraction * args.dict_size)
    if n_dead:
        dead = torch.randperm(args.dict_size, generator=generator)[:n_dead]
        with torch.no_grad():  # really dead, and counted as dead
            trainer.ae._encoder_affine()[1][dead] = -1e4
        trainer.dead.counts[dead] = trainer.cfg.dead_feature_threshold
    for step in range(1, args.warmup + 1):
        trainer.update(step, batch(step))
    times = []
    for step in range(args.warmup + 1, args.warmup + 1 + args.steps):
        sync()
        start = time.perf_counter()
        trainer.update(step, batch(step))
        sync()
        times.append(time.perf_counter() - start)
    weight = trainer.ae._encoder_affine()[0].detach().clone()

    def timed(work, repeats: int = 5) -> float:
        work()
        runs = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            work()
            sync()
            runs.append(time.perf_counter() - start)
        return 1000 * statistics.median(runs)

    gemm = timed(lambda: torch.nn.functional.linear(pool[0], weight))
    parameters = [torch.nn.Parameter(p.detach().clone()) for p in trainer.ae.parameters()]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    optimizer = adam(parameters, 1e-4)
    floor = timed(lambda: (torch.nn.functional.linear(pool[0], weight), optimizer.step()))
    print(json.dumps({"peer": "ours", "step_ms_median": 1000 * statistics.median(times),
                      "gemm_ms": gemm, "gemm_adam_ms": floor,
                      "dead_latents_measured": int(trainer.dead.mask(
                          trainer.cfg.dead_feature_threshold).sum())}))


def ours(shape: dict, arch: str, threads: int, device: str, encoder_dtype: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--arch", arch,
               "--threads", str(threads), "--device", device, "--encoder-dtype", encoder_dtype]
    for key, value in shape.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "THP_MEM_ALLOC_ENABLE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"peer": "ours", "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def measure(d_in: int, latents: int, k: int, batch: int, dead: float, arch: str, peers: list[str],
            args: argparse.Namespace) -> dict:
    shape = dict(d_in=d_in, dict_size=latents, k=k, batch=batch, steps=args.steps,
                 warmup=args.warmup, dead_fraction=dead, seed=0)
    sides: dict[str, list[dict]] = {}
    names = ["ours", *peers]
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:  # alternating order
            if name == "ours":
                result = ours(shape, arch, args.threads, args.device, args.encoder_dtype)
            else:
                peer, script, extra = ARCH_PEERS.get(arch, (name, "peer_step.py", ()))
                if args.device != "cpu":
                    extra = (*extra, "--device", args.device)
                result = run_peer(peer, threads=args.threads, script=BENCH / script,
                                  extra_args=extra, python=args.peer_python, **shape)
            sides.setdefault(name, []).append(result)
    row = {"arch": arch, **shape}
    for name, results in sides.items():
        good = [r for r in results if "error" not in r]
        if not good:
            row[name] = {"error": str(results[-1].get("error"))[:200]}
            continue
        row[name] = {"step_ms": min(r["step_ms_median"] for r in good),
                     "rounds_ms": [round(r["step_ms_median"], 1) for r in good],
                     "version": good[0].get("version")}
        if name == "ours":
            row["gemm_ms"] = min(r["gemm_ms"] for r in good)
            row["gemm_adam_ms"] = min(r["gemm_adam_ms"] for r in good)
    return row


def table(rows: list[dict], peers: list[str]) -> str:
    head = ["arch", "d_in", "latents", "k", "batch", "dead", "ours ms",
            *[f"{p} ms" for p in peers], *[f"vs {p}" for p in peers], "GEMM ms",
            "GEMM+Adam ms", "floor / ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        mine = row["ours"].get("step_ms")
        cells = [row["arch"], row["d_in"], f"{row['dict_size']:,}", row["k"], f"{row['batch']:,}",
                 f"{row['dead_fraction']:.0%}", f"{mine:,.0f}" if mine else "failed"]
        theirs = [row.get(p, {}).get("step_ms") for p in peers]
        cells += [f"{t:,.0f}" if t else "-" for t in theirs]
        cells += [f"{t / mine:.2f}x" if t and mine else "-" for t in theirs]
        floor = row.get("gemm_adam_ms")
        cells += [f"{row.get('gemm_ms', 0):,.0f}", f"{floor or 0:,.0f}",
                  f"{floor / mine:.2f}" if floor and mine else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", action="store_true",
                        help="BatchTopK, Matryoshka and a transcoder at d_in 2,048, 16,384 latents")
    parser.add_argument("--quick", action="store_true", help="toy sizes, one round, two steps")
    parser.add_argument("--peers", nargs="*", default=["eai-sparsify"])
    parser.add_argument("--dead", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "scale.json")
    parser.add_argument("--device", default="cpu", help="cuda: every side on the GPU")
    parser.add_argument("--encoder-dtype", default="",
                        help="our trainers' encoder_dtype (auto: bfloat16 where it is fast); "
                             "default float32 like every other side")
    parser.add_argument("--peer-python", default=None,
                        help="run the peers with this python (default: their venvs, "
                             "bench/setup_peers.sh)")
    # the worker's own arguments (one side, in its own process)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="topk", help=argparse.SUPPRESS)
    for name in ("d-in", "dict-size", "k", "batch", "seed"):
        parser.add_argument(f"--{name}", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dead-fraction", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.warmup, args.rounds = 2, 1, 1
    points = [("topk", *shape) for shape in (QUICK if args.quick else GRID)]
    if args.architectures:
        points = [(arch, *(QUICK[0] if args.quick else (2048, 16384, 64, 1024)))
                  for arch in ARCHITECTURES]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.device != "cpu":
        import torch

        machine = f"{torch.cuda.get_device_name()} ({machine})"
    print(f"TopK-family training steps, float32 (our encoder GEMM: "
          f"{args.encoder_dtype or 'float32'}), on {args.device}, {args.threads} threads, "
          f"{machine}; {args.steps} timed steps, best of {args.rounds} rounds")
    rows = []
    for arch, d_in, latents, k, batch in points:
        for dead in args.dead:
            peers = [p for p in args.peers if arch in ("topk", "transcoder")]
            if arch in ARCH_PEERS and arch != "topk":
                peers = [ARCH_PEERS[arch][0]]
            rows.append(measure(d_in, latents, k, batch, dead, arch, peers, args))
            print(json.dumps(rows[-1]), flush=True)
    names = sorted({key for row in rows for key in row if key in
                    ("eai-sparsify", "sae-lens", "dictionary-learning")})
    print()
    print(table(rows, names))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"),
                                     "device": args.device, "threads": args.threads,
                                     "encoder_dtype": args.encoder_dtype or "float32",
                                     "rows": rows}, indent=1))
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()

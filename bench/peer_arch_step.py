"""Time one JumpReLU or Matryoshka BatchTopK SAE training step of a peer package, run inside that
peer's own venv.

Standalone on purpose (it never imports our `dictionary_learning`; `bench/setup_peers.sh` builds one
venv per peer), run with that venv's python, e.g.

    python bench/peer_arch_step.py --peer sae-lens --arch matryoshka --d-in 576 --dict-size 4608 --k
        32 \
        --batch 4096 --steps 20 --warmup 3 --dead-fraction 0.0 --seed 0 --threads 2

It builds the peer's SAE and trainer the way a user of that package would, feeds it a fixed pool of
synthetic float32 activations (generated before timing), runs `--warmup` untimed steps and then
`--steps` timed ones, and prints one JSON line (the keys of bench/peer_step.py's, plus "arch",
"l0_measured" and the architecture's settings).

Architectures (`--arch`):
- `jumprelu`: a JumpReLU SAE trained toward an average L0 of `--target-l0` (default `--k`). Every
  side starts with per-latent thresholds set from its own pre-activations on the first pool batch so
  that each latent fires on target_l0 / dict_size of the tokens (L0 ~ target from the first step, as
  late in a real run; the packages' own initial thresholds, 0.001 or 0.01, make about half the
  latents fire).
  - `dictionary-learning` (Marks', PyPI 0.1.0): `JumpReluTrainer` + `JumpReluAutoEncoder`, one step
    = `trainer.update(step, x)` (dense codes, loss with its (L0 / target_l0 - 1)^2 penalty,
    backward, removal of the gradient parallel to decoder rows, clipping, Adam, LR schedule, decoder
    re-normalisation).
  - `sae-lens` (6.x): `JumpReLUTrainingSAE` with `jumprelu_sparsity_loss_mode="quadratic"` and
    `target_l0` (its Gemma Scope 2 penalty around a target L0, the nearest to upstream's) +
    `SAETrainer`, one step = the body of `SAETrainer.fit()` without wandb (as bench/peer_step.py).
    No per-step decoder re-normalisation (its design).
- `matryoshka`: a Matryoshka BatchTopK SAE, k `--k` per token on average, nested groups of
  `--group-fractions` of dict_size (upstream's split: int(fraction * dict_size) for all but the last
  group, which takes the rest).
  - `dictionary-learning`: `MatryoshkaBatchTopKTrainer` + `MatryoshkaBatchTopKSAE`, one step =
    `trainer.update(step, x)` (batch top-k, one prefix reconstruction loss per group, AuxK, the rest
    as for JumpReLU). Step 0 computes the geometric median for `b_dec` in the untimed warm-up;
    `threshold_start_step=1` so timed steps include the inference-threshold update, as every step
    after the first 1000 of a real run does.
  - `sae-lens`: `MatryoshkaBatchTopKTrainingSAE` with `matryoshka_widths` = the cumulative group
    sizes, + its `SAETrainer` (its BatchTopK threshold update runs every step).

`--dead-fraction f` (Matryoshka only: neither package's JumpReLU training has a dead-latent loss by
default): the same latents as bench/peer_step.py's are made really dead and counted as dead by the
peer, so AuxK runs every step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from peer_step import (
    POOL_BATCHES,
    dead_latent_ids,
    killing_bias,
    make_pool,
    peer_version,
    reference_gemm_ms,
    uncontended_figures,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEERS = ("dictionary-learning", "sae-lens")
ARCHS = ("jumprelu", "matryoshka")
GROUP_FRACTIONS = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
LONG_RUN_STEPS = 100_000  # the trainers' total run length: only shapes their LR schedules


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", required=True, choices=PEERS)
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--dict-size", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32,
                        help="Matryoshka: k per token; JumpReLU: default target L0")
    parser.add_argument("--target-l0", type=float, default=None,
                        help="JumpReLU target L0 (default: --k)")
    parser.add_argument("--group-fractions", type=float, nargs="+", default=list(GROUP_FRACTIONS))
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dead-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="activations are scale * randn")
    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    if args.target_l0 is None:
        args.target_l0 = float(args.k)
    return args


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with a benchmark shape (also used by bench_architectures.py), or None."""
    for name in ("d_in", "dict_size", "k", "batch", "steps", "threads"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}"
    if args.warmup < 1:
        return f"--warmup must be >= 1 (step 0 does one-off initialisation), got {args.warmup}"
    if not 0.0 <= args.dead_fraction < 1.0:
        return f"--dead-fraction must be in [0, 1), got {args.dead_fraction}"
    if args.arch == "jumprelu" and args.dead_fraction:
        return (f"--dead-fraction applies to --arch matryoshka only, got {args.dead_fraction} "
                "for jumprelu")
    if args.k > args.dict_size:
        return f"--k ({args.k}) must be <= --dict-size ({args.dict_size})"
    target = args.target_l0 if args.target_l0 is not None else args.k
    if not 0 < target < args.dict_size:
        return f"--target-l0 must be in (0, dict_size={args.dict_size}), got {target}"
    fractions = args.group_fractions
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f <= 0 for f in fractions):
        return (f"--group-fractions must be positive and sum to 1, got {fractions} "
                f"(sum {sum(fractions)})")
    if any(size <= 0 for size in group_sizes(fractions, args.dict_size)):
        return f"--group-fractions {fractions} leave an empty group at dict_size {args.dict_size}"
    return None


def group_sizes(fractions: list[float], dict_size: int) -> list[int]:
    """Upstream's split: int(fraction * dict_size) latents per group but the last, which takes the
    rest."""
    sizes = [int(fraction * dict_size) for fraction in fractions[:-1]]
    return sizes + [dict_size - sum(sizes)]


def thresholds_for_l0(torch, pre, target_l0: float):
    """Per-latent thresholds `[dict_size]` under which each latent fires (pre > threshold) on
    round(batch * target_l0 / dict_size) rows of `pre` [batch, dict_size]: halfway between its
    rank-th and (rank+1)-th largest pre-activation, and above zero (JumpReLU thresholds are
    positive)."""
    batch, dict_size = pre.shape
    rank = min(batch - 1, max(1, round(batch * target_l0 / dict_size)))
    with torch.no_grad():
        top = pre.topk(rank + 1, dim=0).values  # [rank + 1, dict_size]
        return ((top[rank - 1] + top[rank]) / 2).clamp_min(1e-6)


def time_steps(torch, step: Callable[[int, Any], None], pool: list,
               args: argparse.Namespace) -> dict:
    """`--warmup` untimed steps, then `--steps` timed ones cycling through `pool`: the timing
    figures."""
    for index in range(args.warmup):
        step(index, pool[index % len(pool)])
    times, cpu_times = [], []
    load_before = os.getloadavg()[0]
    cpu_start = time.process_time()
    for index in range(args.warmup, args.warmup + args.steps):
        x = pool[index % len(pool)]
        start, cpu_step_start = time.perf_counter(), time.process_time()
        step(index, x)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_step_start)
    cpu_seconds = time.process_time() - cpu_start
    total = sum(times)
    return dict(
        tokens_per_s=round(args.batch * args.steps / total, 1),
        step_ms=round(1000 * total / args.steps, 2),
        step_ms_median=round(1000 * statistics.median(times), 2),
        step_ms_min=round(1000 * min(times), 2),
        tokens_per_s_best=round(args.batch / min(times), 1),
        # ~ threads * step_ms when uncontended
        cpu_ms_per_step=round(1000 * cpu_seconds / args.steps, 2),
        **uncontended_figures(times, cpu_times, args),
        loadavg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
    )


def measured_l0(torch, encode: Callable[[Any], Any], x) -> float:
    """Average number of non-zero codes per row of `encode(x)`."""
    with torch.no_grad():
        return round(float((encode(x) != 0).sum(dim=-1).float().mean()), 2)


# dictionary-learning (Marks', PyPI 0.1.0) ---------------------------------------------------------
def build_dictionary_learning(torch, args, pool, dead_ids) -> dict:
    torch.manual_seed(args.seed)
    if args.arch == "jumprelu":
        from dictionary_learning.trainers.jumprelu import JumpReluTrainer

        trainer = JumpReluTrainer(steps=LONG_RUN_STEPS, activation_dim=args.d_in,
                                  dict_size=args.dict_size, layer=0, lm_name="synthetic",
                                  seed=args.seed, target_l0=args.target_l0, device="cpu")
        with torch.no_grad():
            _, pre = trainer.ae.encode(pool[0], output_pre_jump=True)
            trainer.ae.threshold.copy_(thresholds_for_l0(torch, pre, args.target_l0))
    else:
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

        trainer = MatryoshkaBatchTopKTrainer(
            steps=LONG_RUN_STEPS, activation_dim=args.d_in, dict_size=args.dict_size, k=args.k,
            layer=0, lm_name="synthetic", group_fractions=list(args.group_fractions),
            threshold_start_step=1, seed=args.seed, device="cpu")
        # step 0 sets b_dec to the batch's geometric median: bound pre-activations generously
        if len(dead_ids):
            bias = killing_bias(torch, pool, pool[0].mean(0), trainer.ae.W_enc.detach())
            with torch.no_grad():
                trainer.ae.b_enc[dead_ids] = bias
            trainer.num_tokens_since_fired[dead_ids] = trainer.dead_feature_threshold

    def dead_count() -> int:
        return int((trainer.num_tokens_since_fired >= trainer.dead_feature_threshold).sum())

    def encode(x):
        return (trainer.ae.encode(x, use_threshold=False) if args.arch == "matryoshka"
                else trainer.ae.encode(x))

    return {"step": trainer.update, "dead_count": dead_count, "encode": encode}


# sae-lens (6.x) -----------------------------------------------------------------------------------
def build_sae_lens(torch, args, pool, dead_ids) -> dict:
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    torch.manual_seed(args.seed)
    if args.arch == "jumprelu":
        from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            d_in=args.d_in, d_sae=args.dict_size, dtype="float32", device="cpu",
            jumprelu_sparsity_loss_mode="quadratic", target_l0=args.target_l0))
        with torch.no_grad():
            _, pre = sae.encode_with_hidden_pre(pool[0])
            sae.threshold.copy_(thresholds_for_l0(torch, pre, args.target_l0))
    else:
        from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

        sizes = group_sizes(args.group_fractions, args.dict_size)
        widths = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=args.d_in, d_sae=args.dict_size, k=float(args.k), matryoshka_widths=widths,
            dtype="float32", device="cpu"))
    # as sae_lens.synthetic.training.train_toy_sae builds it (constant LR 3e-4, no wandb)
    trainer_cfg = SAETrainerConfig(total_training_samples=LONG_RUN_STEPS * args.batch,
                                   train_batch_size_samples=args.batch, device="cpu", lr=3e-4,
                                   lr_end=3e-4, lr_scheduler_name="constant",
                                   logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    if len(dead_ids):
        bias = killing_bias(torch, pool, sae.b_dec.detach(), sae.W_enc.detach())
        with torch.no_grad():
            sae.b_enc[dead_ids] = bias
        trainer.n_forward_passes_since_fired[dead_ids] = trainer_cfg.dead_feature_window + 1

    def step(index: int, x) -> None:  # the body of SAETrainer.fit() with wandb logging off
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer._checkpoint_if_needed()
        trainer.n_training_steps += 1

    def dead_count() -> int:
        return int(trainer.dead_neurons.sum())

    def encode(x):
        return sae.encode_with_hidden_pre(x)[0]  # the training codes (batch top-k for Matryoshka)

    return {"step": step, "dead_count": dead_count, "encode": encode}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict[str, Any] = {
        "peer": args.peer, "arch": args.arch, "version": peer_version(args.peer),
        "tokens_per_s": None, "step_ms": None, "d_in": args.d_in, "dict_size": args.dict_size,
        "k": args.k, "batch": args.batch, "dead_fraction": args.dead_fraction, "steps": args.steps,
        "warmup": args.warmup, "threads": args.threads, "seed": args.seed,
    }
    if args.arch == "jumprelu":
        result["target_l0"] = args.target_l0
    else:
        result["group_sizes"] = group_sizes(args.group_fractions, args.dict_size)
    try:
        import torch

        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        result["torch"] = torch.__version__
        result["reference_gemm_ms"] = reference_gemm_ms(torch, args)
        pool = make_pool(torch, args)
        dead_ids = dead_latent_ids(torch, args)
        build = build_dictionary_learning if args.peer == "dictionary-learning" else build_sae_lens
        side = build(torch, args, pool, dead_ids)
        result.update(time_steps(torch, side["step"], pool, args))
        result.update(dead_latents_requested=len(dead_ids),
                      dead_latents_measured=side["dead_count"](),
                      l0_measured=measured_l0(torch, side["encode"], pool[1 % POOL_BATCHES]))
    except Exception as error:  # noqa: BLE001 (report, don't crash: the caller parses one JSON line)
        message = str(error).strip().splitlines()
        result["error"] = f"{type(error).__name__}: {message[0][:160] if message else ''}"
        frames = traceback.extract_tb(error.__traceback__)[-4:]
        result["where"] = [f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in frames]
        print(json.dumps(result), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

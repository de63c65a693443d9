"""Soak: does a long run's memory stay bounded? Resident memory (RSS) over hundreds of buffer
refreshes, with many trainers and a checkpoint written every few steps.

    python bench/bench_soak.py [--model tiny-llama] [--refreshes 300] [--trainers 4]
        [--checkpoint-steps 5]

Three phases, each printing RSS (MB, from /proc/self/status) every `--every` refreshes and the
growth from the first sample after warm-up (the first 10% of refreshes) to the last:
  1. ActivationBuffer io="out", drained for `--refreshes` refreshes;
  2. ActivationBuffer io="in_to_out" (an MLP's input and output), the same;
  3. trainSAE with `--trainers` TopK trainers on an io="out" buffer, a checkpoint every
     `--checkpoint-steps` steps, until the buffer has refreshed `--refreshes` times.
After each phase glibc's malloc_trim(0) shows how much of the RSS is freed heap the allocator had
kept.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import tempfile
import time

import torch

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Counted(ActivationBuffer):
    """An ActivationBuffer that counts its refreshes and samples RSS every `every` of them."""

    def __init__(self, *args, every: int, **kwargs):
        self.refreshes, self.every, self.samples = 0, every, []
        super().__init__(*args, **kwargs)

    def refresh(self) -> None:
        super().refresh()
        self.refreshes += 1
        if self.refreshes % self.every == 0:
            self.samples.append((self.refreshes, rss_mb()))


def report(label: str, samples: list[tuple[int, float]], refreshes: int, seconds: float) -> None:
    warm = [rss for n, rss in samples if n >= refreshes // 10] or [samples[0][1]]
    print(f"\n{label}: {refreshes} refreshes in {seconds:.0f} s")
    print("  refreshes: " + " ".join(f"{n:>6d}" for n, _ in samples))
    print("  RSS (MB):  " + " ".join(f"{rss:6.0f}" for _, rss in samples))
    before_trim = rss_mb()
    gc.collect()
    malloc_trim()
    print(f"  growth after warm-up: {warm[-1] - warm[0]:+.1f} MB ({warm[0]:.0f} -> "
          f"{warm[-1]:.0f}); peak {max(r for _, r in samples):.0f} MB; after malloc_trim(0): "
          f"{rss_mb():.0f} MB (from {before_trim:.0f})")


def drain(buffer: Counted, refreshes: int) -> None:
    while buffer.refreshes < refreshes:
        next(buffer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--refreshes", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--trainers", type=int, default=4)
    parser.add_argument("--checkpoint-steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model(args.model)
    kwargs = dict(n_ctxs=64, ctx_len=64, refresh_batch_size=16, out_batch_size=1024,
                  every=args.every)
    print(f"{args.model}, layer {args.layer}: buffers of {64 * 64} tokens, batches of 1024; RSS at "
          f"start {rss_mb():.0f} MB")

    start = time.perf_counter()
    buffer = Counted(default_corpus(repeat=True), model, hook(model, args.layer, "resid"), **kwargs)
    drain(buffer, args.refreshes)
    report('1. ActivationBuffer io="out"', buffer.samples, args.refreshes,
           time.perf_counter() - start)
    del buffer

    start = time.perf_counter()
    buffer = Counted(default_corpus(repeat=True), model, (hook(model, args.layer, "mlp_in"),
                                                          hook(model, args.layer, "mlp_out")),
                     io="in_to_out", **kwargs)
    drain(buffer, args.refreshes)
    report('2. ActivationBuffer io="in_to_out"', buffer.samples, args.refreshes,
           time.perf_counter() - start)
    del buffer

    start = time.perf_counter()
    buffer = Counted(default_corpus(repeat=True), model, hook(model, args.layer, "resid"), **kwargs)
    width = buffer.d_submodule
    # a refresh each time half the buffer (2 batches) is read
    steps = args.refreshes * (64 * 64 // 2) // 1024
    configs = [dict(trainer=TopKTrainer, activation_dim=width, dict_size=8 * width, k=8, lr=1e-3,
                    steps=steps,
                    seed=i, device="cpu") for i in range(args.trainers)]
    with tempfile.TemporaryDirectory() as save_dir:
        trainSAE(buffer, configs, steps, save_dir=save_dir, checkpoint_steps=args.checkpoint_steps,
                 progress=False)
    report(f"3. trainSAE, {args.trainers} trainers, {steps} steps, a checkpoint every "
           f"{args.checkpoint_steps} steps ({steps // args.checkpoint_steps} in "
           "all)", buffer.samples, buffer.refreshes,
           time.perf_counter() - start)


if __name__ == "__main__":
    main()

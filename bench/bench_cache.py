"""ActivationCache (shuffled batches read from safetensors shards on disk) against batches already
in memory.

    python bench/bench_cache.py [--tokens 393216 --d 576 --batch 4096 --shard-tokens 65536
                                 --window-shards 2]
    python bench/bench_cache.py --model tiny-llama --layer 1
        # real activations through write_cache

A cache of `--tokens` rows is written (synthetic Gaussian rows through `cache_from_tensors`, or a
model's activations through `write_cache`, the same shard writer), then one epoch of batches is
drawn, each batch touched (summed), by:
  - ActivationCache: memory-mapped shards, a window of shards read at a time, batches gathered in
    shuffled order (the shards were just written, so they sit in the page cache; its peak RSS
    increase is measured in a fresh process over one epoch);
  - `buffer.epochs`: a random gather per batch from an in-RAM tensor (what the quickstart trains
    from);
  - slices of an in-RAM tensor shuffled beforehand (the ceiling: no copy at all).
Prints tokens/s (median of the repeats), the ratios, and the peak RSS increase against the window's
size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dictionary_learning.buffer import epochs
from dictionary_learning.cache import ActivationCache, cache_from_tensors, write_cache


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024


def rss_mb() -> float:
    """Current resident set size in MB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process image in MB (VmHWM: unlike getrusage's ru_maxrss,
    which after exec still holds the forking parent's peak)."""
    return _status_mb("VmHWM")


def drain(batches, n: int) -> float:
    """Seconds to draw n batches and touch each."""
    start = time.perf_counter()
    for _, batch in zip(range(n), batches):
        batch.sum()
    return time.perf_counter() - start


def read_cache(path: str, batch: int, window_shards: int) -> None:
    """Child process: one epoch of the reader; print JSON with its RSS before and at its peak."""
    before = rss_mb()
    cache = ActivationCache(path, batch, window_shards=window_shards)
    drain(cache, len(cache))
    print(json.dumps({"peak_rows": cache.peak_rows, "rss_before_mb": before,
                      "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=393216)
    parser.add_argument("--d", type=int, default=576, help="width of the synthetic rows")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--shard-tokens", type=int, default=65536)
    parser.add_argument("--window-shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model",
                        help="write real activations of this model (e.g. tiny-llama) instead")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--folder", help="where to write the cache (default: a temporary folder)")
    # internal: the child process reading a cache
    parser.add_argument("--read", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        return read_cache(args.read, args.batch, args.window_shards)

    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = Path(folder) / "cache"
        start = time.perf_counter()
        if args.model:
            from dictionary_learning import default_corpus, hook, load_model

            model = load_model(args.model)
            write_cache(model, default_corpus(repeat=True), hook(model, args.layer, "resid"), path,
                        args.tokens, shard_tokens=args.shard_tokens, model_name=args.model)
            # in RAM
            activations = torch.cat([t for t in ActivationCache(path, args.tokens, epochs=1)])
        else:
            activations = torch.randn(args.tokens, args.d,
                                      generator=torch.Generator().manual_seed(0))
            cache_from_tensors(path, activations, shard_tokens=args.shard_tokens,
                               model_name="synthetic")
        written = time.perf_counter() - start
        n, d = activations.shape
        size_mb = sum(p.stat().st_size for p in path.iterdir()) / 2**20
        print(f"cache: {n} tokens x {d} float32 ({size_mb:.0f} MB) in {-(-n // args.shard_tokens)} "
              f"shards of {args.shard_tokens}, written in {written:.2f} s ({n / written:,.0f} "
              f"tokens/s); batch {args.batch}, window {args.window_shards} shards, "
              f"{torch.get_num_threads()} threads")

        child = subprocess.run([sys.executable, __file__, "--read", str(path), "--batch",
                                str(args.batch),
                                "--window-shards", str(args.window_shards)], capture_output=True,
                               text=True, check=True)
        reader = json.loads(child.stdout.strip().splitlines()[-1])
        n_batches = n // args.batch
        shuffled = activations[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
        sides = {"ActivationCache (disk, mmap)": lambda seed: ActivationCache(path, args.batch,
                                                                              seed=seed,
                                                                              window_shards=args.window_shards),
                 "epochs(): gather from RAM": lambda seed: epochs(activations, args.batch, seed),
                 "pre-shuffled RAM slices": lambda seed: iter(shuffled.split(args.batch))}
        times = {name: [] for name in sides}
        # interleaved, so drift in machine load hits every side alike
        for seed in range(args.repeats):
            for name, batches in sides.items():
                times[name].append(drain(batches(seed), n_batches))
        tokens = n_batches * args.batch
        rates = {name: tokens / statistics.median(t) for name, t in times.items()}
        best = {name: tokens / min(t) for name, t in times.items()}
        for name, rate in rates.items():
            runs = ", ".join(f"{t:.3f}" for t in times[name])
            print(f"  {name:32s} {rate:12,.0f} tokens/s median, {best[name]:12,.0f} best   ({runs} "
                  "s)")
        for label, figures in (("median", rates), ("best", best)):
            cache_rate = figures["ActivationCache (disk, mmap)"]
            print(f"  {label}: cache / epochs() throughput ratio "
                  f"{cache_rate / figures['epochs(): gather from RAM']:.2f}; cache / pre-shuffled "
                  f"slices {cache_rate / figures['pre-shuffled RAM slices']:.2f}")
        window_mb = reader["peak_rows"] * d * activations.element_size() / 2**20
        print(f"  reader peak RSS increase: {reader['peak_rss_mb'] - reader['rss_before_mb']:.0f} "
              f"MB (peak rows held {reader['peak_rows']} = {window_mb:.0f} MB; whole cache "
              f"{size_mb:.0f} MB)")


if __name__ == "__main__":
    main()

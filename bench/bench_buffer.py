"""ActivationBuffer throughput against a bare transformers forward truncated at the same layer, on
the same tokens.

    python bench/bench_buffer.py [--model smollm2-135m] [--layer 3] [--dtype float32] [--texts 384]
    python bench/bench_buffer.py --layer 15 --dtype bfloat16 --take 32768   # the quickstart's way

Both sides tokenize the same texts in the same batches (left padded, ctx_len 128). The bare side
runs the Hugging Face model with a forward hook on the layer that raises to stop the pass; the
buffer side drains an ActivationBuffer (nnsight trace stopped after the layer, padding dropped,
shuffled, refilled when half drained). Throughput counts real (non-padding) tokens. Prints both
figures and the ratio of times (target: <= 1.15). `--take N`: the buffer side is `take(N)` from a
longer text source (as the quickstart collects), the bare side runs batches until N tokens.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.models import get_module


class _Stop(Exception):
    pass


def bare_forward(model, texts, layer_path, batch_size, ctx_len, limit=None) -> int:
    """Tokenize and run the plain HF model up to `layer_path` (until `limit` real tokens, if
    given); returns the number of real tokens."""
    torch_model, tokenizer = model._module, model.tokenizer
    module = get_module(model, layer_path)

    def stop(_module, _args, output):
        raise _Stop

    handle = module.register_forward_hook(stop)
    tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start : start + batch_size], return_tensors="pt",
                                  padding=True, truncation=True, max_length=ctx_len)
                try:
                    torch_model(**batch)
                except _Stop:
                    pass
                tokens += int(batch["attention_mask"].sum())
                if limit is not None and tokens >= limit:
                    break
    finally:
        handle.remove()
    return tokens


def buffer_drain(model, texts, point, batch_size, ctx_len, n_ctxs, dtype, take=None) -> int:
    buffer = ActivationBuffer(iter(texts), model, point, n_ctxs=n_ctxs, ctx_len=ctx_len,
                              refresh_batch_size=batch_size, out_batch_size=4096, dtype=dtype)
    if take is not None:
        return buffer.take(take).shape[0]
    return sum(batch.shape[0] for batch in buffer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--texts", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--n-ctxs", type=int, default=96,
                        help="buffer capacity in contexts (refills several times)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--take", type=int, default=None,
                        help="time take(N) from a longer source against a bare forward of N tokens")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype)
    point = hook(model, args.layer, "resid")
    texts = list(itertools.islice(default_corpus(), args.texts))
    # warm up both paths
    bare_forward(model, texts[: args.batch], point.path, args.batch, args.ctx_len)
    buffer_drain(model, texts[: args.batch], point, args.batch, args.ctx_len, args.n_ctxs, dtype)

    times = {"bare": [], "buffer": []}
    counts = {}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
        start = time.perf_counter()
        counts["bare"] = bare_forward(model, texts, point.path, args.batch, args.ctx_len,
                                      args.take)
        times["bare"].append(time.perf_counter() - start)
        start = time.perf_counter()
        counts["buffer"] = buffer_drain(model, texts, point, args.batch, args.ctx_len, args.n_ctxs,
                                        dtype, args.take)
        times["buffer"].append(time.perf_counter() - start)
    if args.take is not None:  # per token: the bare side stops at the batch passing N
        times["bare"] = [t * args.take / counts["bare"] for t in times["bare"]]
        counts["bare"] = args.take
    if counts["bare"] != counts["buffer"]:
        raise RuntimeError(f"token counts differ: bare {counts['bare']}, buffer {counts['buffer']}")

    print(f"model {args.model}, layer {args.layer} resid, {args.dtype}, {len(texts)} texts, "
          f"{counts['bare']} tokens, batch {args.batch} x ctx {args.ctx_len}, "
          f"{torch.get_num_threads()} threads")
    median = {side: statistics.median(t) for side, t in times.items()}
    for side, label in (("bare", "bare transformers forward, truncated"),
                        ("buffer", "ActivationBuffer")):
        runs = ", ".join(f"{t:.2f}" for t in times[side])
        print(f"  {label:38s} {counts[side] / median[side]:9.0f} tokens/s   (median of {runs} s)")
    print(f"  buffer / bare time ratio: {median['buffer'] / median['bare']:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()

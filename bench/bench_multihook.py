"""The modules of an SCAE suite from one model pass against one buffer per module, same tokens, one
run.

    python bench/bench_multihook.py [--layers 3] [--texts 96] [--steps 12] [--dtype bfloat16]

A suite of L layers has 2L modules (attn_L reads attn_out, mlp_L the pair mlp_in -> mlp_out). Two
ways to get them the same activations from the same texts:
- one pass: one ActivationBuffer over the dict of all 2L hook points; every batch of texts runs the
  model once, the trace stopped after the last layer's MLP;
- separate: 2L ActivationBuffers, one per module, each running the model (stopped after its own
  module).
Both sides are timed twice: draining the buffers (activation collection only) and training every
module with trainSAE for `--steps` steps (one trainSAE over the dict stream against 2L trainSAE
calls, one per buffer). Prints tokens/s and the speedup; the collection speedup approaches the
number of modules when the model's forward dominates (it is below 2L because a separate buffer for
an early layer stops its pass early).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from dictionary_learning import ActivationBuffer, default_corpus, load_model
from dictionary_learning.models import d_model
from dictionary_learning.scae import suite_hook_points
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE


def buffers(model, texts, points, args, one_pass: bool) -> list:
    options = dict(n_ctxs=args.n_ctxs, ctx_len=args.ctx_len, refresh_batch_size=args.batch_texts,
                   out_batch_size=args.batch, dtype=args.torch_dtype)
    if one_pass:
        return [ActivationBuffer(texts, model, points, **options)]
    return [ActivationBuffer(texts, model, point,
                             io="in_to_out" if isinstance(point, tuple) else "out", **options)
            for point in points.values()]


def rows(batch) -> int:
    """Activation vectors in a batch (a tensor, an (x, y) pair or a dict of them)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return (batch[0] if isinstance(batch, tuple) else batch).shape[0]


def config(model, name, args) -> dict:
    return dict(trainer=TopKTrainer, activation_dim=d_model(model), dict_size=args.dict_size,
                k=args.k, lr=1e-3, steps=args.steps, warmup_steps=1, seed=0, device="cpu",
                transcoder=name.startswith("mlp"), submodule_name=name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--texts", type=int, default=96)
    parser.add_argument("--batch-texts", type=int, default=16)
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--n-ctxs", type=int, default=48)
    parser.add_argument("--batch", type=int, default=1024, help="activations per training step")
    parser.add_argument("--steps", type=int, default=8, help="training steps per module")
    parser.add_argument("--dict-size", type=int, default=1152)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    args.torch_dtype = getattr(torch, args.dtype)

    model = load_model(args.model, dtype=args.torch_dtype)
    points = suite_hook_points(model, args.layers)
    texts = list(itertools.islice(default_corpus(), args.texts))
    n_modules = len(points)
    print(f"{args.model} ({args.dtype}), {n_modules} modules of layers 0-{args.layers - 1}, "
          f"{len(texts)} texts, ctx {args.ctx_len}, {torch.get_num_threads()} threads")

    collect = {}
    for one_pass in (True, False):
        start = time.perf_counter()
        tokens = sum(rows(batch) for buffer in buffers(model, texts, points, args, one_pass)
                     for batch in buffer)
        collect[one_pass] = (time.perf_counter() - start, tokens // (1 if one_pass else n_modules))
    print("activation collection (draining the buffers):")
    for one_pass, label in ((True, "one pass, dict of hook points"),
                            (False, f"{n_modules} separate buffers")):
        seconds, tokens = collect[one_pass]
        print(f"  {label:32s} {seconds:7.2f} s   {tokens / seconds:8.0f} tokens/s (every module "
              "fed)")
    print(f"  speedup {collect[False][0] / collect[True][0]:.2f}x (the number of modules: "
          f"{n_modules})")

    train = {}
    for one_pass in (True, False):
        start = time.perf_counter()
        if one_pass:
            [buffer] = buffers(model, texts, points, args, True)
            trainSAE(buffer, [config(model, name, args) for name in points], args.steps,
                     progress=False)
        else:
            for name, buffer in zip(points, buffers(model, texts, points, args, False)):
                trainSAE(buffer, [config(model, name, args)], args.steps, progress=False)
        train[one_pass] = time.perf_counter() - start
    tokens = args.steps * args.batch
    print(f"training every module for {args.steps} steps of {args.batch} activations (dict "
          f"{args.dict_size}, k {args.k}):")
    print(f"  one pass, one trainSAE         {train[True]:7.2f} s   {tokens / train[True]:8.0f} "
          "tokens/s")
    print(f"  {n_modules} buffers, {n_modules} trainSAE calls     {train[False]:7.2f} s   "
          f"{tokens / train[False]:8.0f} tokens/s")
    print(f"  speedup {train[False] / train[True]:.2f}x")


if __name__ == "__main__":
    main()

"""Sparse against dense TopK: decoding alone, and a full forward + backward of the training path.

    python bench/bench_topk.py [--batch 4096 --d-in 576 --dict-size 4608 --k 32]

Dense: codes scattered into a [batch, dict_size] matrix, decoded by a GEMM, plain autograd. Sparse:
this toolkit's path (embedding_bag over the k active decoder columns; encoder and decoder backward
as sparse products).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dictionary_learning.dictionary import AutoEncoderTopK
from dictionary_learning.sparse import SparseCode, sparse_decode


def timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--dict-size", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    ae = AutoEncoderTopK(args.d_in, args.dict_size, args.k)
    x = torch.randn(args.batch, args.d_in)
    with torch.no_grad():
        values, indices = ae.topk(x)
    rows = torch.arange(args.batch).repeat_interleave(args.k)
    code = SparseCode(values.relu().flatten(), rows, indices.flatten(), args.batch)
    dense_codes = code.to_dense(args.dict_size)

    with torch.no_grad():
        sparse_ms = timed(lambda: sparse_decode(code, ae.decoder.weight), args.repeats)
        dense_ms = timed(lambda: dense_codes @ ae.decoder.weight.t(), args.repeats)

    def dense_step():
        pre = F.relu(F.linear(x - ae.b_dec, ae.encoder.weight, ae.encoder.bias))
        top, idx = pre.topk(args.k, dim=-1, sorted=False)
        codes = torch.zeros_like(pre).scatter(-1, idx, top)
        loss = (codes @ ae.decoder.weight.t() + ae.b_dec - x).pow(2).sum(-1).mean()
        loss.backward()

    def sparse_step():
        loss = (ae(x) - x).pow(2).sum(-1).mean()
        loss.backward()

    dense_step_ms, sparse_step_ms = (timed(dense_step, args.repeats),
                                     timed(sparse_step, args.repeats))
    encoder_ms = timed(lambda: ae.pre_activations(x), args.repeats)
    print(f"batch {args.batch}, d_in {args.d_in}, dict_size {args.dict_size}, k {args.k}, float32, "
          f"{torch.get_num_threads()} threads")
    print(f"  decode      dense GEMM {dense_ms:8.1f} ms   sparse embedding_bag {sparse_ms:7.1f} "
          f"ms   ratio {dense_ms / sparse_ms:.1f}x")
    print(f"  fwd + bwd   dense      {dense_step_ms:8.1f} ms   sparse               "
          f"{sparse_step_ms:7.1f} ms   ratio {dense_step_ms / sparse_step_ms:.2f}x")
    print(f"  the floor: one encoder GEMM (no grad) {encoder_ms:.1f} ms")


if __name__ == "__main__":
    main()

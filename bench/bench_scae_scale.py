"""SCAE at full depth: time and peak memory of each stage for a suite on every SmolLM2 layer
(60 modules), so the scaling of connection selection, the pruned forward pass and a fine-tuning step
can be read off at real size. The suite is random unless `--train-steps N`: then its modules are
first trained with `train_suite` (every module from one model pass per batch of texts, bf16 model)
for N steps; the later stages' costs do not depend on its quality.

    python bench/bench_scae_scale.py [--layers 30 --dict-size 4608 --k 32 --C 32 --texts 4 --ctx-len
                                      64]
    python bench/bench_scae_scale.py --train-steps 20 --train-step
        # train, select, fine-tune at full depth

Peak memory is the process's peak resident set (ru_maxrss) after each stage, so it only grows; the
increase over the previous stage is what that stage needed beyond everything before it.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time

import torch


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dict-size", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--C", type=int, default=32)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--ctx-len", type=int, default=64)
    parser.add_argument("--train-step", action="store_true",
                        help="also time one fine-tuning step (MSE + CE)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="train the modules from one pass for this many steps first (0: a "
                             "random suite)")
    parser.add_argument("--train-batch", type=int, default=1024,
                        help="activations per training step")
    parser.add_argument("--random-connections", action="store_true",
                        help="skip selection (its cost is known) and use C random connections per "
                             "feature")
    args = parser.parse_args()

    from dictionary_learning import default_corpus, load_model
    from dictionary_learning.scae import (
        Connections,
        SCAESuite,
        SCAETrainer,
        connections_from_statistics,
        contribution_statistics,
        pruned_forward,
        run_suite,
        sources_of,
        train_suite,
        virtual_weights,
    )

    model = load_model("smollm2-135m", attn_implementation="eager")
    texts = list(itertools.islice(default_corpus(), args.texts))
    n_features = 2 * args.layers * args.dict_size
    print(f"SCAE at scale: SmolLM2 first {args.layers} layers ({2 * args.layers} modules, "
          f"{n_features:,} features), dict {args.dict_size}, k {args.k}, C {args.C}, {args.texts} "
          f"texts x {args.ctx_len} tokens, {torch.get_num_threads()} threads")
    print(f"  {'stage':52s} {'seconds':>9s} {'peak RSS MB':>12s}")
    print(f"  {'model loaded':52s} {'':9s} {peak_mb():12.0f}")

    def stage(label, function):
        start = time.perf_counter()
        result = function()
        print(f"  {label:52s} {time.perf_counter() - start:9.1f} {peak_mb():12.0f}", flush=True)
        return result

    if args.train_steps:
        # reads the activations (a bf16 copy: faster)
        reader = load_model("smollm2-135m", dtype=torch.bfloat16)
        suite = stage(f"train_suite: {args.train_steps} steps x {args.train_batch} tokens, one "
                      "pass",
                      lambda: train_suite(reader, args.layers, args.dict_size, args.k,
                                          default_corpus(repeat=True), args.train_steps, lr=1e-3,
                                          warmup_steps=1, n_ctxs=16, ctx_len=args.ctx_len,
                                          refresh_batch_size=16, out_batch_size=args.train_batch,
                                          normalization_batches=2,
                                          progress=False))
        suite = suite.float()
        del reader
    else:
        suite = SCAESuite.random(model, d_sae=args.dict_size, k=args.k, n_layer=args.layers,
                                 seed=0)

    record, _ = stage("run_suite (suite patched in, recorded)",
                      lambda: run_suite(suite, model, texts, ctx_len=args.ctx_len, logits=False))
    tokens = int(record.mask.sum())
    if args.random_connections:
        generator = torch.Generator().manual_seed(0)
        indices = {}
        # C distinct upstream features per row: start + c * stride, c < C, stride < n_up / C
        for name in suite.names:
            n_up, n_features = suite.n_sources(name), suite[name].dict_size
            C = min(args.C, n_up)
            start = torch.randint(max(n_up, 1), (n_features, 1), generator=generator)
            stride = torch.randint(1, max(n_up // max(C, 1), 2), (n_features, 1),
                                   generator=generator)
            indices[name] = (start + torch.arange(C) * stride) % max(n_up, 1)
        with torch.no_grad():
            connections = stage(f"virtual weights of {args.C} random connections per feature",
                                lambda: Connections(indices, {n: virtual_weights(suite, model, n, i)
                                                              for n, i in indices.items()}))
    else:
        statistics = stage(f"contribution statistics ({tokens} tokens)",
                           lambda: contribution_statistics(suite, model, texts,
                                                           batch_size=args.texts,
                                                           ctx_len=args.ctx_len))
        started = time.perf_counter()
        connections = stage(f"select top {args.C} per feature (all module pairs)",
                            lambda: connections_from_statistics(suite, model, statistics, args.C))
        report_selection_bound(suite, model, time.perf_counter() - started)
    stored = sum(t.numel() * t.element_size()
                 for field in (connections.indices, connections.weights)
                 for t in field.values())
    pairs = sum(len(sources_of(name)) for name in suite.names)
    # one float32 [dict_size, dict_size] matrix per module pair
    dense = pairs * args.dict_size**2 * 4
    print(f"  connections stored: {stored / 2**20:.0f} MB (dense virtual weights, one matrix per "
          f"module pair and one per head for attention, would be >= {dense / 2**30:.0f} GB)")
    with torch.no_grad():
        stage("pruned forward pass (all modules, stored weights)",
              lambda: pruned_forward(suite, model, record, connections))
    if args.train_step:
        trainer = SCAETrainer(suite, model, connections, steps=1, ctx_len=args.ctx_len)
        stage("one fine-tuning step (MSE + CE, weights recomputed)",
              lambda: trainer.update(0, texts))


def report_selection_bound(suite, model, seconds: float) -> None:
    """Selection's time against its arithmetic: the GEMMs of every module pair (an MLP pair:
    encoder [d_sae, d] @ sources [d, n_source]; an attention pair also maps the sources through
    each head's W_V and W_O), at the rate of one fp32 GEMM of the same shape measured now."""
    from dictionary_learning.models import attention_ov, d_model
    from dictionary_learning.scae import parse_module_name, sources_of

    d, flops = d_model(model), 0
    for name in suite.names:
        kind, layer = parse_module_name(name)
        for source in sources_of(name, model):
            n_source = suite[source].d_sae
            flops += 2 * suite[name].d_sae * d * n_source
            if kind != "mlp":
                heads, _, d_head = attention_ov(model, layer).W_V.shape
                flops += 2 * 2 * n_source * d * d_head * heads
    d_sae = suite[suite.names[-1]].d_sae
    a, b = torch.randn(d_sae, d), torch.randn(d, d_sae)
    a @ b
    started, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        a @ b
    rate = 2 * d_sae * d * d_sae * repeats / (time.perf_counter() - started)
    print(f"  selection: {flops / 1e12:.2f} TFLOP; at this machine's fp32 GEMM rate "
          f"({rate / 1e9:.0f} GFLOP/s, [{d_sae}, {d}] @ [{d}, {d_sae}]) {flops / rate:.1f} s: "
          f"bound / measured = {flops / rate / seconds:.2f}")


if __name__ == "__main__":
    main()

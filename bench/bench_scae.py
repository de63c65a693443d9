"""The SCAE pruned forward pass against a dense masked-virtual-weight implementation (the reference
fork's approach: a dense [n_features, n_sources] virtual-weight matrix per module, per head for
attention, masked to the kept connections), at the same C and dictionary size, on SmolLM2's first
layers. Prints time and peak memory and ratios.

    python bench/bench_scae.py [--layers 3 --dict-size 2304 --k 32 --C 32 --texts 4 --ctx-len 64]

Each variant runs in its own subprocess so that its peak resident memory (ru_maxrss above the state
after setup) is its own. Both compute the same codes (checked).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time

import torch


def setup(args):
    from dictionary_learning import default_corpus, load_model
    from dictionary_learning.scae import SCAESuite, run_suite

    model = load_model("smollm2-135m", attn_implementation="eager")
    suite = SCAESuite.random(model, d_sae=args.dict_size, k=args.k, n_layer=args.layers, seed=0)
    texts = list(itertools.islice(default_corpus(), args.texts))
    record, _ = run_suite(suite, model, texts, ctx_len=args.ctx_len, logits=False)
    return model, suite, record


def random_connections(suite, C, seed=0):
    generator = torch.Generator().manual_seed(seed)
    indices = {}
    for name in suite.names:
        n_up = suite.n_sources(name)
        c = min(C, n_up)
        indices[name] = (torch.rand(suite[name].dict_size, n_up, generator=generator)
                         .topk(c, dim=1).indices.sort(1).values)
    return indices


@torch.no_grad()
def dense_masked_forward(suite, model, record, indices):
    """Dense virtual weights [n_features, n_sources] (x heads for attention) masked to the
    connections."""
    from dictionary_learning.dictionary import topk_codes
    from dictionary_learning.models import attention_ov, norm_params
    from dictionary_learning.scae import decompose, parse_module_name, sources_of

    codes = {}
    for name in suite.names:
        kind, layer = parse_module_name(name)
        terms = decompose(suite, model, record, name, source_codes={})
        pre = terms["embedding"] + terms["bias"]
        if sources_of(name):
            # [n_up, d]
            decoders = torch.cat([suite[up].decoder.weight.t() for up in sources_of(name)])
            normed = norm_params(model, layer, kind).linear_part(decoders)
            mask = (torch.zeros(suite[name].dict_size, normed.shape[0])
                    .scatter_(1, indices[name], 1.0))
            upstream = (torch.cat([codes[up] for up in sources_of(name)], dim=-1)
                        * record.norm_scales[name][..., None])
            encoder = suite[name].encoder.weight
            if kind == "mlp":
                pre = pre + upstream @ ((encoder @ normed.t()) * mask).t()
            else:
                ov = attention_ov(model, layer)
                mixed = torch.einsum("bhqk,bkj->bhqj", record.patterns[layer], upstream)
                for head in range(ov.W_V.shape[0]):
                    # [n_features, n_up]
                    dense = (encoder @ (normed @ ov.W_V[head] @ ov.W_O[head]).t()) * mask
                    pre = pre + mixed[:, head] @ dense.t()
        codes[name] = topk_codes(pre.relu(), int(suite[name].k))[0]
    return codes


def measure(args) -> None:
    from dictionary_learning.scae import Connections, pruned_forward, virtual_weights

    model, suite, record = setup(args)
    indices = random_connections(suite, args.C)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.variant == "ours":
        @torch.no_grad()
        def run():  # virtual weights for the kept connections, then the pruned pass
            connections = Connections(indices, {n: virtual_weights(suite, model, n, i)
                                                for n, i in indices.items()})
            return pruned_forward(suite, model, record, connections)
    else:
        def run():
            return dense_masked_forward(suite, model, record, indices)
    codes = run()
    start = time.perf_counter()
    for _ in range(args.repeats):
        codes = run()
    seconds = (time.perf_counter() - start) / args.repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
    checksum = sum(float(c.sum()) for c in codes.values())
    print(json.dumps({"variant": args.variant, "seconds": seconds, "peak_mb": peak / 1024,
                      "checksum": checksum}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dict-size", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--C", type=int, default=32)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--ctx-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", choices=["ours", "dense"], default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        measure(args)
        return
    results = {}
    for variant in ("ours", "dense"):
        command = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "variant"]
        output = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"{variant} failed: {output.stderr[-2000:]}")
        results[variant] = json.loads(lines[-1])
    print(f"SCAE pruned forward pass: SmolLM2 first {args.layers} layers ({2 * args.layers} "
          f"modules), {args.dict_size} features, k {args.k}, C {args.C}, {args.texts} texts x "
          f"{args.ctx_len} tokens, {torch.get_num_threads()} threads")
    for variant, label in (("ours", "pruned pass (sparse connections)"),
                           ("dense", "dense masked virtual weights")):
        r = results[variant]
        print(f"  {label:40s} {r['seconds'] * 1000:9.1f} ms   peak +{r['peak_mb']:8.1f} MB")
    ours, dense = results["ours"], results["dense"]
    same = abs(ours["checksum"] - dense["checksum"]) <= 1e-3 * (1 + abs(dense["checksum"]))
    print(f"  dense / ours: time {dense['seconds'] / ours['seconds']:.2f}x, peak memory "
          f"{dense['peak_mb'] / max(ours['peak_mb'], 1e-3):.2f}x   (same codes: {same})")


if __name__ == "__main__":
    main()

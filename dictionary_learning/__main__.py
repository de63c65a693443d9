"""Command line: `python -m dictionary_learning <command> --help`.

collect  read activations out of a model at a hook point and print their statistics (offline defaults)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .buffer import ActivationBuffer
from .data import text_source
from .models import DEFAULT_MODEL, SITES, default_dtype, hook, load_model, n_layers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str, device: str) -> torch.dtype:
    return default_dtype(device) if name == "auto" else DTYPES[name]


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m (default, offline), tiny-llama, "
                        "tiny-gpt2, a local directory or a hub id")
    parser.add_argument("--layer", type=int, default=None, help="layer (default: the middle one)")
    parser.add_argument("--site", default="resid", choices=SITES)
    parser.add_argument("--data", default=None, help="text: python-docs (default, offline), a .txt/.jsonl file or "
                        "folder, or a hub dataset id[:split]")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="model and activation dtype; auto: bfloat16 where the hardware is fast at it, else float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--remove-bos", action=argparse.BooleanOptionalAction, default=True,
                        help="drop each context's first token (BOS or attention sink; default: drop)")


def activation_statistics(x: torch.Tensor) -> dict[str, float]:
    """Summary statistics of a `[n, d]` activation matrix."""
    x = x.float()
    norms = x.norm(dim=-1)
    centred = x - x.mean(dim=0)
    total_variance = centred.pow(2).sum(dim=-1).mean()
    singular = torch.linalg.svdvals(centred[:20000]) if x.shape[0] > 1 else torch.zeros(1)
    explained = singular.pow(2) / singular.pow(2).sum().clamp_min(1e-12)
    return {
        "tokens": x.shape[0],
        "width": x.shape[1],
        "mean_norm": norms.mean().item(),
        "median_norm": norms.median().item(),
        "max_norm": norms.max().item(),
        "norm_of_mean": x.mean(dim=0).norm().item(),
        "total_variance": total_variance.item(),
        "top1_pc_variance_fraction": explained[0].item(),
        "top10_pc_variance_fraction": explained[:10].sum().item(),
        "fraction_outlier_norm_tokens": (norms > 10 * norms.median()).float().mean().item(),
    }


def collect(args: argparse.Namespace) -> dict:
    dtype = _dtype(args.dtype, args.device)
    start = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=dtype)
    layer = n_layers(model) // 2 if args.layer is None else args.layer
    point = hook(model, layer, args.site)
    print(f"model {args.model} loaded in {time.perf_counter() - start:.1f} s; reading {point} ({str(dtype)[6:]})",
          file=sys.stderr)
    buffer = ActivationBuffer(text_source(args.data), model, point, n_ctxs=max(1, args.tokens // args.ctx_len),
                              ctx_len=args.ctx_len, refresh_batch_size=args.batch, out_batch_size=4096,
                              device=args.device, dtype=dtype, remove_bos=args.remove_bos)
    batches, count = [], 0
    start = time.perf_counter()
    with tqdm(total=args.tokens, desc="collecting", unit="tok", file=sys.stderr) as progress:
        for batch in buffer:
            batch = batch[: args.tokens - count]
            batches.append(batch)
            count += batch.shape[0]
            progress.update(batch.shape[0])
            if count >= args.tokens:
                break
    seconds = time.perf_counter() - start
    activations = torch.cat(batches)
    stats = {"model": args.model, "hook": str(point), "tokens_per_second": count / seconds,
             **activation_statistics(activations)}
    print(json.dumps(stats, indent=2))
    if args.out:
        from safetensors.torch import save_file

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        save_file({"activations": activations.contiguous()}, str(tmp),
                  metadata={"buffer_config": json.dumps(buffer.config), "model": args.model})
        tmp.replace(out)
        print(f"saved {tuple(activations.shape)} to {out}", file=sys.stderr)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dictionary_learning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("collect", help="collect activations and print their statistics")
    _add_model_arguments(p)
    p.add_argument("--tokens", type=int, default=20000, help="how many token vectors to collect")
    p.add_argument("--batch", type=int, default=32, help="texts per forward pass")
    p.add_argument("--out", default=None, help="save the activations to this .safetensors file")
    p.set_defaults(run=collect)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

"""Command line: `python -m dictionary_learning <command> --help`.

train    the quickstart: a TopK SAE on SmolLM2's middle layer on the offline corpus, then a report folder
collect  read activations out of a model at a hook point and print their statistics
scae     evaluate a saved SCAE suite: CE and per-module FVU / L0 against C, and with its own connections
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
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
    start = time.perf_counter()
    activations = buffer.take(args.tokens, progress=True)
    seconds = time.perf_counter() - start
    count = activations.shape[0]
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


def cached_batches(activations: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches over an in-memory activation tensor, a new permutation each epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        permutation = torch.randperm(activations.shape[0], generator=generator)
        for start in range(0, activations.shape[0] - batch_size + 1, batch_size):
            yield activations[permutation[start : start + batch_size]]


def train(args: argparse.Namespace) -> dict:
    """Collect activations once, train a TopK SAE on them for several epochs, evaluate, write the report."""
    import itertools

    from .evaluation import evaluate, feature_density, plot_feature_density, top_activating_contexts
    from .trainers import TopKTrainer
    from .training import trainSAE
    from .utils import atomic_write, atomic_write_json

    started = time.perf_counter()
    out = Path(args.out)
    dtype = _dtype(args.dtype, args.device)
    model = load_model(args.model, device=args.device, dtype=dtype)
    layer = n_layers(model) // 2 if args.layer is None else args.layer
    point = hook(model, layer, args.site)
    print(f"{args.model} {point} ({str(dtype)[6:]}): collecting {args.tokens} training tokens", file=sys.stderr)

    # held-out text for evaluation first, the rest for training
    texts = text_source(args.data, repeat=True)
    eval_texts = list(itertools.islice(texts, args.eval_texts))
    buffer_kwargs = dict(ctx_len=args.ctx_len, refresh_batch_size=args.batch_texts, device=args.device,
                         dtype=torch.float32, remove_bos=True, seed=args.seed)
    train_buffer = ActivationBuffer(texts, model, point, n_ctxs=max(1, min(args.tokens, 32768) // args.ctx_len),
                                    out_batch_size=4096, **buffer_kwargs)
    activations = train_buffer.take(args.tokens, progress=True)
    collected = time.perf_counter()

    config = dict(trainer=TopKTrainer, activation_dim=activations.shape[1], dict_size=args.dict_size, k=args.k,
                  lr=args.lr, steps=args.steps, warmup_steps=min(100, args.steps // 10), decay_start=int(args.steps * 0.8),
                  dead_feature_threshold=args.dead_tokens, seed=args.seed, device=args.device, layer=layer,
                  lm_name=args.model, submodule_name=str(point), wandb_name="quickstart")
    [trainer] = trainSAE(cached_batches(activations, args.batch, args.seed), [config], args.steps,
                         save_dir=out / "sae", normalize_activations=True, use_wandb=args.wandb,
                         log_steps=max(1, args.steps // 50), run_cfg={"buffer": train_buffer.config})
    trained = time.perf_counter()
    n_collected = int(activations.shape[0])
    del activations

    from .utils import load_dictionary

    sae, _ = load_dictionary(out / "sae" / "trainer_0")  # the saved one: works on raw activations
    eval_buffer = ActivationBuffer(iter(eval_texts), model, point, n_ctxs=max(1, args.eval_tokens // args.ctx_len),
                                   out_batch_size=2048, **buffer_kwargs)
    held_out = eval_buffer.take(args.eval_tokens)
    batches = held_out.split(2048)
    metrics = evaluate(sae, iter(batches), n_batches=len(batches))
    eval_buffer = ActivationBuffer(iter(eval_texts), model, point, n_ctxs=1, **buffer_kwargs)
    loss = evaluate(sae, eval_buffer, max_len=args.ctx_len, batch_size=16, n_batches=1, loss_batches=args.loss_batches)
    metrics.update({k: v for k, v in loss.items() if k.startswith(("ce_", "kl_", "frac_recovered"))})
    density = feature_density(sae, batches)
    metrics.update(
        model=args.model, hook=str(point), dict_size=args.dict_size, k=args.k, steps=args.steps,
        training_tokens_collected=n_collected, batch_size=args.batch,
        tokens_trained=args.steps * args.batch, held_out_tokens=int(held_out.shape[0]),
        dead_features=int((density == 0).sum()), seconds_collect=collected - started,
        seconds_train=trained - collected,
    )
    out.mkdir(parents=True, exist_ok=True)
    plot_feature_density(density, str(out / "feature_density.png"), title=f"{point}, {args.dict_size} features")

    # a handful of features spread over densities, with their top-activating contexts on held-out text
    generator = torch.Generator().manual_seed(args.seed)
    candidates = ((density > 1e-3) & (density < 5e-2)).nonzero().flatten()
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[: args.n_features]].tolist()
    contexts = top_activating_contexts(sae, model, point, eval_texts, chosen, ctx_len=args.ctx_len)
    lines = [f"Top-activating held-out contexts of {len(chosen)} random features with density in (0.1%, 5%)",
             f"{args.model} {point}, TopK SAE with {args.dict_size} features, k={args.k}", ""]
    for feature in chosen:
        lines.append(f"feature {feature}  (fires on {density[feature]:.2%} of held-out tokens)")
        lines += [f"  {value:8.2f}  {text}" for value, text in contexts[feature]]
        lines.append("")
    atomic_write(out / "top_contexts.txt", lambda tmp: Path(tmp).write_text("\n".join(lines)))
    metrics["seconds_total"] = time.perf_counter() - started
    atomic_write_json(out / "metrics.json", metrics)
    table = [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
             for key, value in metrics.items()]
    atomic_write(out / "metrics.md", lambda tmp: Path(tmp).write_text("| metric | value |\n|---|---|\n"
                                                                       + "\n".join(table) + "\n"))
    keys = ("fvu", "cossim", "l0", "frac_alive", "ce_clean", "ce_patched", "ce_zero", "frac_recovered",
            "kl_patched", "seconds_total")
    print("\n".join(f"{key:>16s}: {metrics[key]:.4g}" for key in keys))
    print(f"report written to {out}/ (metrics.md, metrics.json, feature_density.png, top_contexts.txt, sae/)")
    return metrics


def scae(args: argparse.Namespace) -> list[dict]:
    """Select connections on held-out text and print CE (clean, dense suite, pruned suite) against C, per-module
    FVU and L0 at the largest C, and, for a suite saved with connections (fine-tuned), the same with those."""
    import itertools

    from .scae import (
        SCAESuite, ce_table, ce_versus_c, evaluate_suite, module_table, plot_ce_versus_c, plot_connection_statistics,
        select_connections,
    )
    from .utils import atomic_write, atomic_write_json

    try:
        Cs = [int(c) for c in args.Cs.split(",")]
    except ValueError:
        raise ValueError(f"--Cs must be comma-separated integers, got {args.Cs!r}") from None
    suite = SCAESuite.load(args.suite)
    model = load_model(args.model or suite.model_name or DEFAULT_MODEL, attn_implementation="eager")
    texts = text_source(args.data, repeat=True)
    selection_texts = list(itertools.islice(texts, args.selection_texts))
    eval_texts = list(itertools.islice(texts, args.eval_texts))
    kwargs = dict(batch_size=args.batch_texts, ctx_len=args.ctx_len)
    selected = select_connections(suite, model, selection_texts, max(Cs), progress=True, **kwargs)
    rows = ce_versus_c(suite, model, None, eval_texts, Cs, progress=True, connections=selected, **kwargs)
    report = [ce_table(rows), module_table(rows[-1], f"C = {rows[-1]['C']}")]
    if suite.connections is not None:
        own = evaluate_suite(suite, model, eval_texts, suite.connections, **kwargs)
        C = max(i.shape[1] for i in suite.connections.indices.values())
        report.append(f"with the suite's own connections (C = {C}): CE clean {own['ce_clean']:.4f}, dense "
                      f"{own['ce_dense']:.4f}, pruned {own['ce_pruned']:.4f}\n\n" + module_table(own))
    text = "\n\n".join(report) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        atomic_write(out / "ce_versus_c.md", lambda tmp: Path(tmp).write_text(text))
        atomic_write_json(out / "ce_versus_c.json", rows)
        plot_ce_versus_c({"selected on held-out text": rows}, out / "ce_versus_c.png")
        plot_connection_statistics(selected, out / "connections.png")
        print(f"written to {out}/ (ce_versus_c.md, ce_versus_c.json, ce_versus_c.png, connections.png)")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dictionary_learning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="the quickstart: train a TopK SAE, evaluate it, write a report")
    _add_model_arguments(p)
    p.add_argument("--tokens", type=int, default=150_000, help="training activations to collect (once)")
    p.add_argument("--steps", type=int, default=600, help="training steps (epochs over the collected tokens)")
    p.add_argument("--batch", type=int, default=2048, help="activations per training step")
    p.add_argument("--dict-size", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dead-tokens", type=int, default=200_000, help="tokens without firing before a latent "
                   "counts as dead for AuxK")
    p.add_argument("--batch-texts", type=int, default=32, help="texts per forward pass")
    p.add_argument("--eval-texts", type=int, default=150, help="held-out texts (first of the corpus)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--loss-batches", type=int, default=2, help="batches of 16 held-out texts for loss_recovered")
    p.add_argument("--n-features", type=int, default=8, help="features shown in top_contexts.txt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", action="store_true", help="log to wandb ($WANDB_MODE, default offline)")
    p.add_argument("--out", default="reports/quickstart", help="report folder")
    p.set_defaults(run=train)
    p = commands.add_parser("collect", help="collect activations and print their statistics")
    _add_model_arguments(p)
    p.add_argument("--tokens", type=int, default=20000, help="how many token vectors to collect")
    p.add_argument("--batch", type=int, default=32, help="texts per forward pass")
    p.add_argument("--out", default=None, help="save the activations to this .safetensors file")
    p.set_defaults(run=collect)
    p = commands.add_parser("scae", help="evaluate a saved SCAE suite: CE and FVU against C")
    p.add_argument("--suite", required=True, help="a folder written by SCAESuite.save (train_scae_suite writes "
                   "save_dir/suite)")
    p.add_argument("--model", default=None, help="default: the suite's model_name, else smollm2-135m")
    p.add_argument("--data", default=None, help="text: python-docs (default, offline), a .txt/.jsonl file or "
                   "folder, or a hub dataset id[:split]")
    p.add_argument("--Cs", default="1,4,16,64", help="comma-separated connections per feature")
    p.add_argument("--selection-texts", type=int, default=24, help="texts to select connections on (first)")
    p.add_argument("--eval-texts", type=int, default=24, help="texts to measure CE on (the next ones)")
    p.add_argument("--batch-texts", type=int, default=8)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--out", default=None, help="also write the tables and plots to this folder")
    p.set_defaults(run=scae)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

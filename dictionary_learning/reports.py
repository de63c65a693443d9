"""The pipelines behind the command line, as functions a notebook can call too; each returns what it measured.

quickstart   a TopK SAE on a model's middle layer, evaluated on held-out text, with a report folder and a
             feature dashboard
collect      activations at hook points: statistics, optionally saved as safetensors or a disk cache
scae_report  a saved SCAE suite: CE and per-module FVU / L0 against C, and with its own connections
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .buffer import ActivationBuffer, epochs
from .cache import ActivationCache, read_manifest, write_cache
from .checks import check_memory, integer
from .core_metrics import core_groups
from .dashboard import build_dashboard
from .data import text_source
from .evaluation import activation_statistics, evaluate, feature_density, plot_feature_density, top_activating_contexts
from .files import (atomic_write, atomic_write_json, atomic_write_text, check_writable_folder, error_summary,
                    locks_folder)
from .models import DEFAULT_MODEL, d_model, dtype_from_name, hook, load_model, model_fingerprint, n_layers
from .progress import phase
from .scae import (
    SCAESuite, ce_table, ce_versus_c, evaluate_suite, module_table, plot_ce_versus_c, plot_connection_statistics,
    select_connections,
)
from .trainers import TopKTrainer
from .training import trainSAE
from .utils import load_dictionary


@locks_folder("out", "report folder")
def quickstart(model: str = DEFAULT_MODEL, layer: int | None = None, site: str = "resid", data: str | None = None,
               dtype: str = "auto", device: str = "cpu", ctx_len: int | None = None, remove_bos: bool = True,
               tokens: int = 150_000, steps: int = 600, batch: int = 2048, dict_size: int = 4608, k: int = 32,
               lr: float = 1e-3, dead_tokens: int = 200_000, batch_texts: int = 32, eval_texts: int = 150,
               eval_tokens: int = 8192, loss_batches: int = 2, n_features: int = 8, seed: int = 0,
               wandb: bool = False, out: str | Path = "reports/quickstart", cache: str | Path | None = None,
               encoder_dtype: str = "auto", dashboard_features: int = 300,
               dashboard_tokens: int = 8192, progress: bool = True) -> dict[str, Any]:
    """Collect activations once, train a TopK SAE on them for several epochs (normalised, scale folded into the saved
    weights), evaluate it on held-out text (the first `eval_texts` texts, never trained on) and write `out/`:
    metrics.json / metrics.md, saebench_core.json (SAEBench core groups), feature_density.png, top_contexts.txt,
    the SAE in sae/trainer_0/ and a feature dashboard in dashboard/ (index.html: open it from disk; features/:
    circuit-tracer feature files) of the first
    `dashboard_features` features (0: none) on up to `dashboard_tokens` held-out tokens.
    `cache`: train on an activation cache folder (`collect --out DIR`, the same model, holding the layer / site
    asked for) instead of collecting `tokens`; the held-out texts are then the first ones after those the cache
    read, when it read the same text source. `encoder_dtype`: the dtype of the SAE's dense encoder GEMM while
    training ("auto": bfloat16 where the hardware is fast at it; weights and Adam stay float32). `ctx_len`: tokens
    per context (default 128, or with `cache` the cache's own; another than the cache's is refused).
    `progress`: a line on stderr as each phase starts, bars over the long ones (False: quiet); the
    metrics hold each phase's seconds (seconds_collect, seconds_train, seconds_evaluate,
    seconds_loss_recovered, seconds_feature_density, seconds_top_contexts, seconds_dashboard)."""
    started = time.perf_counter()
    out = Path(out)
    for name, value in (("tokens", tokens), ("steps", steps), ("batch", batch), ("dict_size", dict_size),
                        ("dead_tokens", dead_tokens), ("batch_texts", batch_texts), ("eval_texts", eval_texts),
                        ("eval_tokens", eval_tokens), ("loss_batches", loss_batches)):
        integer(name, value)  # before any model is loaded or token collected
    integer("n_features", n_features, low=0)
    integer("dashboard_features", dashboard_features, low=0)
    integer("dashboard_tokens", dashboard_tokens)
    integer("k", k, 1, dict_size, high_name="dict_size")
    if batch > tokens and cache is None:
        raise ValueError(f"batch={batch} exceeds tokens={tokens}: a training step needs batch activations of the "
                         f"{tokens} collected")
    manifest = read_manifest(cache) if cache is not None else None
    if manifest is not None and manifest["model"] != model:
        raise ValueError(f"the cache {str(cache)!r} holds activations of {manifest['model']!r}, not of {model!r}: "
                         f"pass model={manifest['model']!r} (--model)")
    if manifest is not None:  # evaluate on contexts as long as those trained on
        if ctx_len is not None and ctx_len != manifest["ctx_len"]:
            raise ValueError(f"the cache {str(cache)!r} was collected with ctx_len={manifest['ctx_len']}, not "
                             f"ctx_len={ctx_len}: leave ctx_len (--ctx-len) out, or collect again")
        ctx_len = manifest["ctx_len"]
    ctx_len = integer("ctx_len", 128 if ctx_len is None else ctx_len)
    check_writable_folder("out", out)
    torch_dtype = dtype_from_name(dtype, device)
    with phase(f"loading {model} ...", progress):
        lm = load_model(model, device=device, dtype=torch_dtype)
    layer = n_layers(lm) // 2 if layer is None else layer
    point = hook(lm, layer, site)
    if manifest is None:  # the collected activations stay in memory (float32) while training
        check_memory("tokens", tokens, tokens * d_model(lm) * 4, what=" to hold the collected activations")
    elif manifest.get("model_fingerprint") not in (None, model_fingerprint(lm)):
        raise ValueError(f"the cache {str(cache)!r} was collected from another model than this {model!r} (their "
                         f"weights differ, though the name is the same): collect again with this model")
    buffer_kwargs = dict(ctx_len=ctx_len, refresh_batch_size=batch_texts, device=device, dtype=torch.float32,
                         remove_bos=remove_bos, seed=seed, progress=progress)
    if manifest is not None:
        held_out_texts, training = _from_cache(cache, manifest, point, data, eval_texts, batch, seed)
        n_collected = training.n_tokens
        if progress:
            print(f"{model} {point}: training on the cache {cache} ({n_collected:,} tokens)",
                  file=sys.stderr)
    else:  # held-out text for evaluation first, the rest for training
        if progress:
            print(f"{model} {point} ({str(torch_dtype)[6:]}): collecting {tokens:,} training "
                  "tokens ...", file=sys.stderr)
        texts = text_source(data, repeat=True)
        held_out_texts = list(itertools.islice(texts, eval_texts))
        n_ctxs = max(1, min(tokens, 32768) // ctx_len)  # take() reads in chunks of out_batch_size: no larger
        train_buffer = ActivationBuffer(texts, lm, point, n_ctxs=n_ctxs,
                                        out_batch_size=min(4096, n_ctxs * ctx_len), **buffer_kwargs)
        activations = train_buffer.take(tokens, progress=progress)
        n_collected = int(activations.shape[0])
        # the buffer's config (its hook point among it) is saved with the SAE
        training = epochs(activations, batch, seed, config=train_buffer.config)
        del activations  # the epochs iterator holds them
    collected = time.perf_counter()

    config = dict(trainer=TopKTrainer, activation_dim=d_model(lm), dict_size=dict_size, k=k, lr=lr,
                  steps=steps, warmup_steps=min(100, steps // 10), decay_start=int(steps * 0.8),
                  dead_feature_threshold=dead_tokens, seed=seed, device=device, layer=layer, lm_name=model,
                  submodule_name=str(point), wandb_name="quickstart",
                  encoder_dtype=None if encoder_dtype == "float32" else encoder_dtype)
    # scaled to mean squared norm = width (the April 2024 update's target), which the quickstart's lr was tuned on
    trainSAE(training, [config], steps, save_dir=out / "sae", normalize_activations="d_model", use_wandb=wandb,
             log_steps=max(1, steps // 50), progress=progress)
    trained = time.perf_counter()
    del training

    sae, _ = load_dictionary(out / "sae" / "trainer_0")  # the saved one: works on raw activations
    with phase(f"evaluating on {eval_tokens:,} held-out tokens ...", progress) as evaluating:
        n_ctxs = max(1, eval_tokens // ctx_len)
        eval_buffer = ActivationBuffer(iter(held_out_texts), lm, point, out_batch_size=min(2048, n_ctxs * ctx_len),
                                       n_ctxs=n_ctxs, **buffer_kwargs)
        held_out = eval_buffer.take(eval_tokens, progress=progress)
        batches = held_out.split(2048)
        metrics = evaluate(sae, iter(batches), n_batches=len(batches), progress=progress)
    line = f"loss recovered over {loss_batches} batches of 16 held-out texts ..."
    with phase(line, progress) as recovering:
        # one text fills this buffer; loss_recovered reads the following ones
        eval_buffer = ActivationBuffer(iter(held_out_texts), lm, point, n_ctxs=1,
                                       out_batch_size=ctx_len,
                                       **{**buffer_kwargs, "refresh_batch_size": 1})
        loss = evaluate(sae, eval_buffer, max_len=ctx_len, batch_size=16, n_batches=1,
                        loss_batches=loss_batches, progress=progress)
    metrics.update({key: value for key, value in loss.items() if key.startswith(("ce_", "kl_", "frac_recovered"))})
    line = f"feature density on {held_out.shape[0]:,} held-out tokens ..."
    with phase(line, progress) as measuring:
        density = feature_density(sae, batches, progress=progress)
    metrics.update(
        model=model, hook=str(point), ctx_len=ctx_len, dict_size=dict_size, k=k, steps=steps,
        encoder_dtype=encoder_dtype,
        training_tokens_collected=n_collected,
        batch_size=batch, tokens_trained=steps * batch, held_out_tokens=int(held_out.shape[0]),
        dead_features=int((density == 0).sum()), seconds_collect=collected - started,
        seconds_train=trained - collected, seconds_evaluate=evaluating.seconds,
        seconds_loss_recovered=recovering.seconds, seconds_feature_density=measuring.seconds,
    )
    _write_metrics(out, metrics)  # the figures first: the extras below may fail, the figures stay

    def extra(name: str, make: Callable[[], Any]) -> None:
        """An optional part of the report: skipped with a warning and a note in metrics.json if it fails."""
        try:
            make()
        except Exception as error:  # the figures are written; an extra that cannot run never loses them
            warnings.warn(f"the report's {name} was skipped: {error_summary(error)}")
            metrics.setdefault("skipped", {})[name] = error_summary(error)

    extra("feature density plot", lambda: plot_feature_density(density, str(out / "feature_density.png"),
                                                              title=f"{point}, {dict_size} features"))
    extra("top contexts", lambda: _top_contexts(sae, lm, point, held_out_texts, density, n_features, ctx_len, seed,
                                                 model, dict_size, k, out, metrics, progress))
    if dashboard_features:
        shown = min(dashboard_features, dict_size)

        def draw() -> None:
            with phase(f"dashboard: {shown} features on up to {dashboard_tokens:,} held-out tokens ...",
                       progress) as drawing:
                meta = {"dictionary": "quickstart SAE", "model": model,
                        "data": f"{data or 'python-docs'}, held-out texts"}
                build_dashboard(sae, lm, point, held_out_texts, out / "dashboard",
                                features=dashboard_features, tokens=dashboard_tokens, ctx_len=ctx_len,
                                remove_bos=remove_bos, seed=seed, meta=meta, progress=progress)
            metrics["seconds_dashboard"] = drawing.seconds

        extra("dashboard", draw)
    metrics["seconds_total"] = time.perf_counter() - started
    _write_metrics(out, metrics)
    keys = ("fvu", "cossim", "l0", "frac_alive", "ce_clean", "ce_patched", "ce_zero", "frac_recovered",
            "kl_patched", "ce_loss_score", "kl_div_score", "seconds_dashboard", "seconds_total")
    print("\n".join(f"{key:>16s}: {metrics.get(key, float('nan')):.4g}" for key in keys))
    print(f"report written to {out}/ (metrics.md, metrics.json, saebench_core.json, feature_density.png, "
          "top_contexts.txt, sae/"
          + (", dashboard/index.html: open it in a browser" if dashboard_features else "") + ")")
    return metrics


def _write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    """metrics.json, saebench_core.json and metrics.md."""
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "saebench_core.json", core_groups(metrics))
    table = [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
             for key, value in metrics.items()]
    atomic_write_text(out / "metrics.md", "| metric | value |\n|---|---|\n" + "\n".join(table) + "\n")


def _top_contexts(sae: Any, lm: Any, point: Any, texts: list[str], density: torch.Tensor, n_features: int,
                  ctx_len: int, seed: int, model: str, dict_size: int, k: int, out: Path, metrics: dict[str, Any],
                  progress: bool) -> None:
    """top_contexts.txt: the strongest held-out contexts of a few random features of density in (0.1%, 5%)."""
    generator = torch.Generator().manual_seed(seed)
    candidates = ((density > 1e-3) & (density < 5e-2)).nonzero().flatten()
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:n_features]].tolist()
    line = f"top contexts of {len(chosen)} features on {len(texts)} held-out texts ..."
    with phase(line, progress) as searching:
        contexts = top_activating_contexts(sae, lm, point, texts, chosen, ctx_len=ctx_len, progress=progress)
    metrics["seconds_top_contexts"] = searching.seconds
    lines = [f"Top-activating held-out contexts of {len(chosen)} random features with density in (0.1%, 5%)",
             f"{model} {point}, TopK SAE with {dict_size} features, k={k}", ""]
    if not chosen:
        lines.append("(no feature fires on between 0.1% and 5% of the held-out tokens: none shown)" if n_features
                     else "(n_features=0: none shown)")
    for feature in chosen:
        lines.append(f"feature {feature}  (fires on {density[feature]:.2%} of held-out tokens)")
        lines += [f"  {value:8.2f}  {text}" for value, text in contexts[feature]]
        lines.append("")
    atomic_write_text(out / "top_contexts.txt", "\n".join(lines))


def _from_cache(cache: str | Path, manifest: dict[str, Any], point: Any, data: str | None, eval_texts: int,
                batch: int, seed: int) -> tuple[list[str], ActivationCache]:
    """(held-out texts, endless shuffled batches of `point` from the cache): the held-out texts follow the last text
    the cache read when it read this text source (so none was trained on), else they are the source's first."""
    entries = manifest["entries"]
    if entries is not None:
        if str(point) not in entries:
            raise ValueError(f"the cache {str(cache)!r} holds {sorted(entries)}, not {point}: pass the layer and site "
                             f"of one of them")
        training = ActivationCache(cache, batch, seed=seed, entries=str(point), epochs=None, dtype=torch.float32)
    else:
        hooks = manifest["hooks"]
        if len(hooks) != 1 or (hooks[0]["path"], hooks[0]["io"]) != (point.path, point.io):
            raise ValueError(f"the cache {str(cache)!r} holds {[h['name'] or h['path'] for h in hooks]}, not "
                             f"{point}: pass the layer and site it was collected at")
        training = ActivationCache(cache, batch, seed=seed, epochs=None, dtype=torch.float32)
    texts = text_source(data)
    if manifest["source"] == (data or "python-docs"):  # skip what the cache read (a partly read batch whole)
        read = manifest["position"] + (manifest["batch_texts"] if manifest["position_rows"] else 0)
        texts = itertools.islice(texts, read, None)
    held_out = list(itertools.islice(texts, eval_texts))
    if len(held_out) < eval_texts:
        raise ValueError(f"only {len(held_out)} texts of {data or 'python-docs'} are left after those the cache "
                         f"{str(cache)!r} read, {eval_texts} asked for (eval_texts): collect fewer tokens, or "
                         f"evaluate on other text (data=...)")
    return held_out, training


def _layers_and_sites(lm: Any, layer: int | None, site: str, layers: str | list[int] | None,
                      sites: str | list[str] | None) -> dict[str, Any]:
    """The hook points `collect` reads, by name ("layers.1.mlp_out"): every layer of `layers` (else `layer`, else the
    middle one) at every site of `sites` (else `site`)."""
    if layers is not None and layer is not None:
        raise ValueError(f"give layer={layer} or layers={layers!r}, not both")
    if isinstance(layers, str):
        try:
            layers = [int(part) for part in layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers must be comma-separated integers such as 0,1,2, got {layers!r}") from None
    if isinstance(sites, str):
        sites = [part.strip() for part in sites.split(",")]
    layers = layers if layers is not None else [n_layers(lm) // 2 if layer is None else layer]
    points = {}
    for number in layers:
        for name in sites or [site]:
            point = hook(lm, number, name)
            points[str(point)] = point
    return points


def collect(model: str = DEFAULT_MODEL, layer: int | None = None, site: str = "resid", data: str | None = None,
            dtype: str = "auto", device: str = "cpu", ctx_len: int = 128, remove_bos: bool = True,
            tokens: int = 20000, batch: int = 32, out: str | Path | None = None, layers: str | list[int] | None = None,
            sites: str | list[str] | None = None, shard_tokens: int = 65536, progress: bool = True
            ) -> dict[str, Any]:
    """Read `tokens` activation vectors at a hook point (default: the middle layer's residual stream), or at every
    layer of `layers` times every site of `sites` from one model pass, and print their statistics as JSON.
    `out` ending in .safetensors: save them there as one file (with the buffer's config; one tensor per hook point,
    named like "layers.1.mlp_out", when there are several). Another `out` is a cache folder: the activations are
    written there as shards of `shard_tokens` rows (see `cache.write_cache`; `tokens` counts all of the cache's
    tokens, and running the same command again continues an interrupted or shorter collection); statistics are then
    of a shuffled sample of up to 20000 of them.
    `progress`: a line on stderr as each phase starts, bars over the long ones (False: quiet)."""
    from safetensors.torch import save_file

    for name, value in (("tokens", tokens), ("ctx_len", ctx_len), ("batch", batch), ("shard_tokens", shard_tokens)):
        integer(name, value)  # before the model is loaded
    to_cache = out is not None and not str(out).endswith(".safetensors")
    if out is not None and not to_cache and Path(out).is_dir():
        raise ValueError(f"out must be a .safetensors file path, got the folder {str(out)!r}")
    if to_cache:
        check_writable_folder("out", out)
    torch_dtype = dtype_from_name(dtype, device)
    start = time.perf_counter()
    with phase(f"loading {model} ...", progress):
        lm = load_model(model, device=device, dtype=torch_dtype)
    points = _layers_and_sites(lm, layer, site, layers, sites)
    if not to_cache:  # held in memory, one row per token at every hook point
        check_memory("tokens", tokens, tokens * d_model(lm) * len(points) * torch_dtype.itemsize,
                     what=f" to hold {len(points)} hook point(s) in {str(torch_dtype)[6:]}")
    submodule = next(iter(points.values())) if len(points) == 1 else points
    if progress:
        print(f"model {model} loaded in {time.perf_counter() - start:.1f} s; reading "
              f"{', '.join(points)} ({str(torch_dtype)[6:]})", file=sys.stderr)
    start = time.perf_counter()
    if to_cache:
        before = read_manifest(out)["n_tokens"] if (Path(out) / "manifest.json").exists() else 0
        with phase(f"writing up to {tokens:,} tokens to the cache {out} ...", progress):
            write_cache(lm, text_source(data), submodule, out, tokens, ctx_len=ctx_len,
                        batch_texts=batch, shard_tokens=shard_tokens, remove_bos=remove_bos,
                        dtype=torch_dtype, model_name=model, source=data or "python-docs",
                        progress=progress)
        seconds = time.perf_counter() - start
        cache = ActivationCache(out, min(20000, read_manifest(out)["n_tokens"]), seed=0)
        sample, added = next(cache), cache.n_tokens - before
        stats = {"model": model, "hooks": list(points), "out": str(out), "cache_tokens": cache.n_tokens,
                 "shards": len(cache.shards), "tokens_added": added, "tokens_per_second": added / seconds}
    else:
        n_ctxs = max(1, tokens // ctx_len)
        buffer = ActivationBuffer(text_source(data), lm, submodule, n_ctxs=n_ctxs, ctx_len=ctx_len,
                                  refresh_batch_size=batch, out_batch_size=min(4096, n_ctxs * ctx_len), device=device,
                                  dtype=torch_dtype, remove_bos=remove_bos, progress=progress)
        with phase(f"collecting {tokens:,} tokens ...", progress):
            sample = buffer.take(tokens, progress=progress)
        seconds = time.perf_counter() - start
        rows = next(iter(sample.values())) if isinstance(sample, dict) else sample
        stats = {"model": model, "hook": ", ".join(points), "tokens_per_second": rows.shape[0] / seconds}
    rows = next(iter(sample.values())) if isinstance(sample, dict) else sample
    with phase(f"statistics of {rows.shape[0]:,} activation vectors ...", progress):
        if isinstance(sample, dict):
            stats["statistics"] = {name: activation_statistics(value)
                                   for name, value in sample.items()}
        else:
            stats.update(activation_statistics(sample))
    print(json.dumps(stats, indent=2))
    if out and not to_cache:
        metadata = {"buffer_config": json.dumps(buffer.config), "model": model}
        tensors = ({name: value.contiguous() for name, value in sample.items()} if isinstance(sample, dict)
                   else {"activations": sample.contiguous()})
        atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        print(f"saved {tuple(rows.shape)} per hook point to {out}", file=sys.stderr)
    elif to_cache:
        print(f"cache {out}: {stats['cache_tokens']} tokens in {stats['shards']} shards", file=sys.stderr)
    return stats


def scae_report(suite: str | Path, model: str | None = None, data: str | None = None, Cs: str | list[int] = "1,4,16,64",
                selection_texts: int = 24, eval_texts: int = 24, batch_texts: int = 8, ctx_len: int = 128,
                out: str | Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Select connections on held-out text and print CE (clean, dense suite, pruned suite) against C, per-module
    FVU and L0 at the largest C, and, for a suite saved with connections (fine-tuned), the same with those.
    `Cs`: a list or comma-separated string. With `out`, also writes the tables (.md, .json) and plots there.
    `progress`: a line on stderr as each phase starts, bars over the long ones (False: quiet)."""
    if isinstance(Cs, str):
        try:
            Cs = [int(c) for c in Cs.split(",")]
        except ValueError:
            raise ValueError(f"--Cs must be comma-separated integers, got {Cs!r}") from None
    for name, value in (("selection_texts", selection_texts), ("eval_texts", eval_texts),
                        ("batch_texts", batch_texts), ("ctx_len", ctx_len)):
        integer(name, value)
    suite = SCAESuite.load(suite)
    with phase(f"loading {model or suite.model_name or DEFAULT_MODEL} ...", progress):
        lm = load_model(model or suite.model_name or DEFAULT_MODEL, attn_implementation="eager")
    try:
        suite.check_model(lm)
    except ValueError as error:
        raise ValueError(f"{error}: the suite was not trained on {model or suite.model_name or DEFAULT_MODEL}; "
                         f"name its model (--model / model=)") from error
    texts = text_source(data, repeat=True)
    selection = list(itertools.islice(texts, selection_texts))
    evaluation = list(itertools.islice(texts, eval_texts))
    kwargs = dict(batch_size=batch_texts, ctx_len=ctx_len)
    with phase(f"selecting connections (C = {max(Cs)}) on {len(selection)} texts ...", progress):
        selected = select_connections(suite, lm, selection, max(Cs), progress=progress, **kwargs)
    with phase(f"CE against C = {', '.join(map(str, Cs))} on {len(evaluation)} texts ...",
               progress):
        rows = ce_versus_c(suite, lm, None, evaluation, Cs, progress=progress,
                           connections=selected, **kwargs)
    report = [ce_table(rows), module_table(rows[-1], f"C = {rows[-1]['C']}")]
    if suite.connections is not None:
        line = f"evaluating the suite's own connections on {len(evaluation)} texts ..."
        with phase(line, progress):
            own = evaluate_suite(suite, lm, evaluation, suite.connections, progress=progress,
                                 **kwargs)
        C = max(i.shape[1] for i in suite.connections.indices.values())
        report.append(f"with the suite's own connections (C = {C}): CE clean {own['ce_clean']:.4f}, dense "
                      f"{own['ce_dense']:.4f}, pruned {own['ce_pruned']:.4f}\n\n" + module_table(own))
    text = "\n\n".join(report) + "\n"
    print(text)
    if out:
        out = Path(out)
        atomic_write_text(out / "ce_versus_c.md", text)
        atomic_write_json(out / "ce_versus_c.json", rows)
        plot_ce_versus_c({"selected on held-out text": rows}, out / "ce_versus_c.png")
        plot_connection_statistics(selected, out / "connections.png")
        print(f"written to {out}/ (ce_versus_c.md, ce_versus_c.json, ce_versus_c.png, connections.png)")
    return rows

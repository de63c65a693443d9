"""The pipelines behind the command line, as functions a notebook can call too; each returns what it
measured.

quickstart   (here) a TopK SAE on a model's middle layer, evaluated on held-out text, with a
             report folder and a feature dashboard
collect      (`collection.py`) activations at hook points: statistics, optionally saved as
             safetensors or a disk cache
scae_report  (`suite.py`) a saved SCAE suite: CE and per-module FVU / L0 against C, and with its
             own connections
circuit_report  (`circuit.py`) a sparse feature circuit over saved dictionaries on prompt pairs

Their options are dataclasses (`configs.py`: `QuickstartConfig`, `CollectConfig`), whose fields the
functions also take as keywords and the command line as flags.
"""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..buffer import ActivationBuffer, epochs
from ..cache import ActivationCache, read_manifest
from ..checks import check_memory, integer
from ..checks import options as check_options
from ..core_metrics import core_groups
from ..dashboard import build_dashboard
from ..data import text_source
from ..evaluation import evaluate, feature_density, plot_feature_density, top_activating_contexts
from ..files import (
    atomic_write_json,
    atomic_write_text,
    check_writable_folder,
    error_summary,
    writer_lock,
)
from ..models import d_model, dtype_from_name, hook, load_model, model_fingerprint, n_layers
from ..progress import phase
from ..trainers import TopKTrainer
from ..training import trainSAE
from ..utils import load_dictionary
from .circuit import circuit_report
from .collection import collect
from .configs import CollectConfig, QuickstartConfig, ReadingConfig
from .suite import scae_report

__all__ = ["CollectConfig", "QuickstartConfig", "ReadingConfig", "circuit_report", "collect",
           "quickstart", "scae_report"]


def quickstart(config: QuickstartConfig | None = None, **options: Any) -> dict[str, Any]:
    """Collect activations once, train a TopK SAE on them for several epochs (normalised, scale
    folded into the saved weights), evaluate it on held-out text (the first `eval_texts` texts,
    never trained on) and write `out/`: metrics.json / metrics.md, saebench_core.json (SAEBench
    core groups), feature_density.png, top_contexts.txt, the SAE in sae/trainer_0/ and a feature
    dashboard in dashboard/ (index.html: open it from disk; features/: circuit-tracer feature files)
    of the first `dashboard_features` features (0: none) on up to `dashboard_tokens` held-out
    tokens.
    `options`: the fields of `QuickstartConfig` (or pass one as `config`; options given as well
    replace its fields).
    `cache`: train on an activation cache folder (`collect --out DIR`, the same model, holding the
    layer / site asked for) instead of collecting `tokens`; the held-out texts are then the first
    ones after those the cache read, when it read the same text source. `encoder_dtype`: the dtype
    of the SAE's dense encoder GEMM while training ("auto": bfloat16 where the hardware is fast at
    it; weights and Adam stay float32). `ctx_len`: tokens per context (default 128, or with `cache`
    the cache's own; another than the cache's is refused).
    `progress`: a line on stderr as each phase starts, bars over the long ones (False: quiet); the
    metrics hold each phase's seconds (seconds_collect, seconds_train, seconds_evaluate,
    seconds_loss_recovered, seconds_feature_density, seconds_top_contexts, seconds_dashboard)."""
    config = check_options(QuickstartConfig, config, options, "quickstart")
    # two runs never mix their files in one report folder
    with writer_lock(config.out, "report folder"):
        return _quickstart(config)


def _quickstart(config: QuickstartConfig) -> dict[str, Any]:
    """quickstart's work, under the report folder's writer lock."""
    started = time.perf_counter()
    out, model, cache, progress = Path(config.out), config.model, config.cache, config.progress
    manifest = read_manifest(cache) if cache is not None else None
    if manifest is not None and manifest["model"] != model:
        raise ValueError(f"the cache {str(cache)!r} holds activations of {manifest['model']!r}, "
                         f"not of {model!r}: pass model={manifest['model']!r} (--model)")
    ctx_len = config.ctx_len
    if manifest is not None:  # evaluate on contexts as long as those trained on
        if ctx_len is not None and ctx_len != manifest["ctx_len"]:
            raise ValueError(f"the cache {str(cache)!r} was collected with "
                             f"ctx_len={manifest['ctx_len']}, not ctx_len={ctx_len}: leave ctx_len "
                             "(--ctx-len) out, or collect again")
        ctx_len = manifest["ctx_len"]
    ctx_len = integer("ctx_len", 128 if ctx_len is None else ctx_len)
    check_writable_folder("out", out)
    torch_dtype = dtype_from_name(config.dtype, config.device)
    with phase(f"loading {model} ...", progress):
        lm = load_model(model, device=config.device, dtype=torch_dtype)
    layer = n_layers(lm) // 2 if config.layer is None else config.layer
    point = hook(lm, layer, config.site)
    if manifest is None:  # the collected activations stay in memory (float32) while training
        check_memory("tokens", config.tokens, config.tokens * d_model(lm) * 4,
                     what=" to hold the collected activations")
    elif manifest.get("model_fingerprint") not in (None, model_fingerprint(lm)):
        raise ValueError(f"the cache {str(cache)!r} was collected from another model than this "
                         f"{model!r} (their weights differ, though the name is the same): collect "
                         "again with this model")
    buffer_kwargs = dict(ctx_len=ctx_len, refresh_batch_size=config.batch_texts,
                         device=config.device, dtype=torch.float32, remove_bos=config.remove_bos,
                         seed=config.seed, progress=progress)
    if manifest is not None:
        held_out_texts, training = _from_cache(manifest, point, config)
        n_collected = training.n_tokens
        filtered = manifest.get("filtered") or {}  # the cache was filtered as it was written
        if progress:
            print(f"{model} {point}: training on the cache {cache} ({n_collected:,} tokens)",
                  file=sys.stderr)
    else:  # held-out text for evaluation first, the rest for training
        if progress:
            print(f"{model} {point} ({str(torch_dtype)[6:]}): collecting {config.tokens:,} "
                  "training tokens ...", file=sys.stderr)
        texts = text_source(config.data, repeat=True)
        held_out_texts = list(itertools.islice(texts, config.eval_texts))
        # take() reads in chunks of out_batch_size: no larger
        n_ctxs = max(1, min(config.tokens, 32768) // ctx_len)
        train_buffer = ActivationBuffer(
            texts, lm, point, n_ctxs=n_ctxs, out_batch_size=min(4096, n_ctxs * ctx_len),
            max_activation_norm_multiple=config.max_activation_norm_multiple, **buffer_kwargs)
        activations = train_buffer.take(config.tokens, progress=progress)
        n_collected = int(activations.shape[0])
        # the buffer's config (its hook point and what its filter dropped) is saved with the SAE
        training = epochs(activations, config.batch, config.seed, config=train_buffer.config)
        del activations  # the epochs iterator holds them
        filtered = train_buffer.filtered.summary()
        if progress:
            print(f"filter (max_activation_norm_multiple={config.max_activation_norm_multiple}): "
                  f"{train_buffer.filtered.line()}", file=sys.stderr)
    collected = time.perf_counter()

    steps = config.steps
    trainer = dict(trainer=TopKTrainer, activation_dim=d_model(lm), dict_size=config.d_sae,
                   k=config.k, lr=config.lr, steps=steps, warmup_steps=min(100, steps // 10),
                   decay_start=int(steps * 0.8), dead_feature_threshold=config.dead_tokens,
                   seed=config.seed, device=config.device, layer=layer, lm_name=model,
                   submodule_name=str(point), wandb_name="quickstart",
                   encoder_dtype=(None if config.encoder_dtype == "float32"
                                  else config.encoder_dtype))
    # scaled to mean squared norm = width (the April 2024 update's target), which the quickstart's
    # lr was tuned on
    trainSAE(training, [trainer], steps, save_dir=out / "sae", normalize_activations="d_model",
             use_wandb=config.wandb, log_steps=max(1, steps // 50), progress=progress)
    trained = time.perf_counter()
    del training

    sae, _ = load_dictionary(out / "sae" / "trainer_0")  # the saved one: works on raw activations
    with phase(f"evaluating on {config.eval_tokens:,} held-out tokens ...", progress) as evaluating:
        n_ctxs = max(1, config.eval_tokens // ctx_len)
        eval_buffer = ActivationBuffer(iter(held_out_texts), lm, point,
                                       out_batch_size=min(2048, n_ctxs * ctx_len), n_ctxs=n_ctxs,
                                       **buffer_kwargs)
        held_out = eval_buffer.take(config.eval_tokens, progress=progress)
        batches = held_out.split(2048)
        metrics = evaluate(sae, iter(batches), n_batches=len(batches), progress=progress)
    line = f"loss recovered over {config.loss_batches} batches of 16 held-out texts ..."
    with phase(line, progress) as recovering:
        # one text fills this buffer; loss_recovered reads the following ones
        eval_buffer = ActivationBuffer(iter(held_out_texts), lm, point, n_ctxs=1,
                                       out_batch_size=ctx_len,
                                       **{**buffer_kwargs, "refresh_batch_size": 1})
        loss = evaluate(sae, eval_buffer, max_len=ctx_len, batch_size=16, n_batches=1,
                        loss_batches=config.loss_batches, mean_ablation=False,
                        progress=progress)
    metrics.update({key: value for key, value in loss.items()
                    if key.startswith(("ce_", "kl_", "frac_recovered"))})
    line = f"feature density on {held_out.shape[0]:,} held-out tokens ..."
    with phase(line, progress) as measuring:
        density = feature_density(sae, batches, progress=progress)
    metrics.update(
        model=model, hook=str(point), ctx_len=ctx_len, dict_size=config.d_sae, k=config.k,
        steps=steps, encoder_dtype=config.encoder_dtype, training_tokens_collected=n_collected,
        batch_size=config.batch, tokens_trained=steps * config.batch,
        held_out_tokens=int(held_out.shape[0]), dead_features=int((density == 0).sum()),
        max_activation_norm_multiple=(config.max_activation_norm_multiple if manifest is None
                                      else manifest["max_activation_norm_multiple"]),
        **{f"training_{key}": value for key, value in filtered.items()},
        seconds_collect=collected - started, seconds_train=trained - collected,
        seconds_evaluate=evaluating.seconds, seconds_loss_recovered=recovering.seconds,
        seconds_feature_density=measuring.seconds,
    )
    _write_metrics(out, metrics)  # the figures first: the extras below may fail, the figures stay

    def extra(name: str, make: Callable[[], Any]) -> None:
        """An optional part of the report: skipped with a warning and a note in metrics.json if it
        fails."""
        try:
            make()
        # the figures are written; an extra that cannot run never loses them
        except Exception as error:
            warnings.warn(f"the report's {name} was skipped: {error_summary(error)}")
            metrics.setdefault("skipped", {})[name] = error_summary(error)

    extra("feature density plot",
          lambda: plot_feature_density(density, str(out / "feature_density.png"),
                                                              title=f"{point}, {config.d_sae} "
                                                                    "features"))
    extra("top contexts",
          lambda: _top_contexts(sae, lm, point, held_out_texts, density, ctx_len, config, metrics))
    if config.dashboard_features:
        shown = min(config.dashboard_features, config.d_sae)

        def draw() -> None:
            with phase(f"dashboard: {shown} features on up to {config.dashboard_tokens:,} held-out "
                       "tokens ...",
                       progress) as drawing:
                meta = {"dictionary": "quickstart SAE", "model": model,
                        "data": f"{config.data or 'python-docs'}, held-out texts"}
                build_dashboard(sae, lm, point, held_out_texts, out / "dashboard",
                                features=config.dashboard_features, tokens=config.dashboard_tokens,
                                ctx_len=ctx_len, remove_bos=config.remove_bos, seed=config.seed,
                                meta=meta, progress=progress)
            metrics["seconds_dashboard"] = drawing.seconds

        extra("dashboard", draw)
    metrics["seconds_total"] = time.perf_counter() - started
    _write_metrics(out, metrics)
    keys = ("fvu_all_tokens", "fvu_typical_tokens", "typical_tokens_excluded", "cossim", "l0",
            "frac_alive", "ce_clean", "ce_patched", "ce_zero", "frac_recovered", "kl_patched",
            "ce_loss_score", "kl_div_score", "training_outliers_dropped", "seconds_dashboard",
            "seconds_total")
    print("\n".join(f"{key:>23s}: {metrics.get(key, float('nan')):.4g}" for key in keys))
    print(f"report written to {out}/ (metrics.md, metrics.json, saebench_core.json, "
          "feature_density.png, top_contexts.txt, sae/"
          + (", dashboard/index.html: open it in a browser" if config.dashboard_features else "")
          + ")")
    return metrics


def _write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    """metrics.json, saebench_core.json and metrics.md."""
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "saebench_core.json", core_groups(metrics))
    table = [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
             for key, value in metrics.items()]
    atomic_write_text(out / "metrics.md",
                      "| metric | value |\n|---|---|\n" + "\n".join(table) + "\n")


def _top_contexts(sae: Any, lm: Any, point: Any, texts: list[str], density: torch.Tensor,
                  ctx_len: int, config: QuickstartConfig, metrics: dict[str, Any]) -> None:
    """top_contexts.txt: the strongest held-out contexts of a few random features of density in
    (0.1%, 5%)."""
    generator = torch.Generator().manual_seed(config.seed)
    candidates = ((density > 1e-3) & (density < 5e-2)).nonzero().flatten()
    order = torch.randperm(len(candidates), generator=generator)
    chosen = candidates[order[:config.n_features]].tolist()
    line = f"top contexts of {len(chosen)} features on {config.eval_tokens:,} held-out tokens ..."
    with phase(line, config.progress) as searching:
        contexts = top_activating_contexts(sae, lm, point, texts, chosen, ctx_len=ctx_len,
                                           progress=config.progress, tokens=config.eval_tokens,
                                           remove_bos=config.remove_bos) if chosen else {}
    metrics["seconds_top_contexts"] = searching.seconds
    lines = [f"Top-activating held-out contexts of {len(chosen)} random features with density in "
             "(0.1%, 5%)",
             f"{config.model} {point}, TopK SAE with {config.d_sae} features, k={config.k}", ""]
    if not chosen:
        lines.append("(no feature fires on between 0.1% and 5% of the held-out tokens: none shown)"
                     if config.n_features else "(n_features=0: none shown)")
    for feature in chosen:
        lines.append(f"feature {feature}  (fires on {density[feature]:.2%} of held-out tokens)")
        lines += [f"  {value:8.2f}  {text}" for value, text in contexts[feature]]
        lines.append("")
    atomic_write_text(Path(config.out) / "top_contexts.txt", "\n".join(lines))


def _from_cache(manifest: dict[str, Any], point: Any,
                config: QuickstartConfig) -> tuple[list[str], ActivationCache]:
    """(held-out texts, endless shuffled batches of `point` from the cache `config.cache`): the
    held-out texts follow the last text the cache read when it read this text source (so none was
    trained on), else they are the source's first."""
    cache, data, eval_texts = config.cache, config.data, config.eval_texts
    entries = manifest["entries"]
    if entries is not None:
        if str(point) not in entries:
            raise ValueError(f"the cache {str(cache)!r} holds {sorted(entries)}, not {point}: pass "
                             "the layer and site of one of them")
        training = ActivationCache(cache, config.batch, seed=config.seed, entries=str(point),
                                   epochs=None, dtype=torch.float32)
    else:
        hooks = manifest["hooks"]
        if len(hooks) != 1 or (hooks[0]["path"], hooks[0]["io"]) != (point.path, point.io):
            raise ValueError(f"the cache {str(cache)!r} holds "
                             f"{[h['name'] or h['path'] for h in hooks]}, not {point}: pass the "
                             "layer and site it was collected at")
        training = ActivationCache(cache, config.batch, seed=config.seed, epochs=None,
                                   dtype=torch.float32)
    texts = text_source(data)
    # skip what the cache read (a partly read batch whole)
    if manifest["source"] == (data or "python-docs"):
        read = manifest["position"] + (manifest["batch_texts"] if manifest["position_rows"] else 0)
        texts = itertools.islice(texts, read, None)
    held_out = list(itertools.islice(texts, eval_texts))
    if len(held_out) < eval_texts:
        raise ValueError(f"only {len(held_out)} texts of {data or 'python-docs'} are left after "
                         f"those the cache {str(cache)!r} read, {eval_texts} asked for "
                         "(eval_texts): collect fewer tokens, or evaluate on other text (data=...)")
    return held_out, training

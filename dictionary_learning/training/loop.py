"""The one training loop of the package (`run_steps`, which `trainSAE` and `scae.train_scae_suite` run on), with
atomic resumable checkpoints (`resume_from_checkpoints` restores every trainer and replays the consumed batches, so a
resumed run ends with the same weights as an uninterrupted one) and offline-capable wandb runs (`start_wandb`)."""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..files import atomic_write, error_summary
from ..progress import progress_bar

CHECKPOINT = "checkpoint.pt"


class Every:
    """`n in Every(k)` for n a positive multiple of k: upstream's int `save_steps` ("save every k steps")."""

    def __init__(self, every: int):
        self.every = every

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and step > 0 and step % self.every == 0


def save_checkpoint(path: Path, trainers: Sequence[Any], step: int, batches_consumed: int,
                    extra: dict[str, Any] | None = None) -> None:
    """Every trainer's state, the step and the batches consumed, in one file written atomically: a crash (or a full
    disk) at any moment leaves the previous complete checkpoint or the new one, never trainers at different steps."""
    state = {"trainers": [trainer.state_dict() for trainer in trainers], "step": step,
             "batches_consumed": batches_consumed, "configs": [_config(trainer) for trainer in trainers],
             **(extra or {})}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _config(trainer: Any) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint, as JSON text values: a `trainers.Trainer`'s
    `cfg.compared_on_resume()` (every hyperparameter), else the trainer's whole `config` (SCAE fine-tuning and
    upstream-style trainers)."""
    cfg = getattr(trainer, "cfg", None)
    config = cfg.compared_on_resume() if hasattr(cfg, "compared_on_resume") else getattr(trainer, "config", None)
    return {key: json.dumps(value, sort_keys=True, default=str) for key, value in (config or {}).items()}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file's contents, loaded with `weights_only=True` (tensors and plain types only: a crafted file
    cannot run code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot load checkpoint {str(path)!r}: it is corrupt, or holds objects other than tensors "
                         f"and plain types, which are refused because unpickling them could run code "
                         f"({error_summary(error)})") from error


def resume_from_checkpoints(trainers: Sequence[Any], path: Path | None, batches: Iterator[Any],
                            resume: bool = True) -> dict[str, Any]:
    """With `resume`, restore every trainer from the checkpoint file `path` (`save_checkpoint`'s) and replay
    `batches` to where the interrupted run stood. Returns the checkpoint's step, batches_consumed and extra keys;
    `{"step": 0, "batches_consumed": 0}` without `resume` or when there is no checkpoint."""
    if not resume:
        return {"step": 0, "batches_consumed": 0}
    if not path:
        raise ValueError("resume=True needs the save_dir of the interrupted run")
    if not Path(path).exists():
        return {"step": 0, "batches_consumed": 0}
    resumed = load_checkpoint(Path(path))
    states = resumed.pop("trainers", None)
    if not isinstance(states, list) or "configs" not in resumed:
        raise ValueError(f"{str(path)!r} is not a checkpoint of this version of the toolkit (no trainers and configs "
                         f"in it): start the run afresh, without resume")
    if len(states) != len(trainers):
        raise ValueError(f"checkpoint {str(path)!r} holds {len(states)} trainers, this run has {len(trainers)}")
    for i, (trainer, saved) in enumerate(zip(trainers, resumed.pop("configs"))):
        now = _config(trainer)
        changed = sorted(key for key in set(saved) | set(now) if saved.get(key) != now.get(key))
        if changed:  # the checkpoint's optimizer and schedule would silently keep the old values
            raise ValueError(f"trainer {i} is configured differently from the checkpoint it would resume: "
                             + "; ".join(f"{key}: {saved.get(key)} in the checkpoint, {now.get(key)} now"
                                         for key in changed))
    for trainer, state in zip(trainers, states):
        trainer.load_state_dict(state)
    for _ in range(resumed["batches_consumed"]):
        next(batches)
    return resumed


def start_wandb(config: dict[str, Any], directory: Path | None, project: str = "dictionary_learning",
                entity: str | None = None, resume: bool = False):
    """A wandb run in the mode $WANDB_MODE names, offline when unset (no network needed; `wandb sync` uploads)."""
    import wandb

    return wandb.init(entity=entity, project=project, mode=os.environ.get("WANDB_MODE", "offline"), config=config,
                      dir=str(directory) if directory else None, resume="allow" if resume else None)


def _largest_norm(batch: Any) -> float | None:
    """The largest vector norm in a batch (a tensor, a pair or a dict of them), for a divergence message."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch.values()) if isinstance(batch, dict) \
        else list(batch) if isinstance(batch, (tuple, list)) else []
    norms = [t.double().norm(dim=-1).max().item() for t in tensors if isinstance(t, torch.Tensor) and t.numel()]
    return max(norms) if norms else None


def check_finite(trainers: Sequence[Any], step: int, batch: Any, checkpoint: Path | None, checkpointed: int,
                 weights: bool = False) -> None:
    """Stop a run whose loss (or, with `weights`, a parameter) stopped being finite, naming the step, the trainer
    and the likely causes, before anything of it is saved: the last checkpoint and earlier saves stay as they
    were, and `resume=True` continues from that checkpoint once the cause is fixed."""
    for i, trainer in enumerate(trainers):
        loss = (getattr(trainer, "last_metrics", None) or {}).get("loss")
        loss = float(loss) if isinstance(loss, (int, float, torch.Tensor)) and not isinstance(loss, bool) else None
        bad = f"its loss is {loss}" if loss is not None and not math.isfinite(loss) else None
        if bad is None and weights:
            module = getattr(trainer, "ae", None) or getattr(trainer, "suite", None)
            for name, parameter in (module.named_parameters() if module is not None else ()):
                if not torch.isfinite(parameter).all():
                    bad = f"its parameter {name} holds NaN / inf"
                    break
        if bad is None:
            continue
        config = getattr(trainer, "config", None) or {}
        norm = _largest_norm(batch) if batch is not None else None
        lr = config.get("lr")
        causes = [f"a learning rate too large (lr={lr:.3g})" if isinstance(lr, (int, float)) else
                  "a learning rate too large",
                  "activations too large" + (f" (this batch's largest norm is {norm:.3g})" if norm else ""),
                  "float16 autocast overflowing (use bfloat16)", "a NaN hyperparameter"]
        kept = (f"the checkpoint of step {checkpointed} in {str(checkpoint.parent)!r} is intact: fix the cause and "
                f"resume=True continues from it" if checkpoint is not None and checkpointed > 0
                else "no checkpoint of this run was written")
        raise FloatingPointError(f"training diverged at step {step}: trainer {i} ({type(trainer).__name__}) stopped "
                                 f"being finite ({bad}). Likely causes: {'; '.join(causes)}. Nothing of this step "
                                 f"was saved; {kept}.")


def run_steps(
    trainers: Sequence[Any],
    batches: Iterator[Any],
    steps: int | None,
    start: int = 0,
    consumed: int = 0,
    checkpoint_path: Path | None = None,
    checkpoint_steps: int | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    save_steps: Sequence[int] = (),
    on_save: Callable[[int], None] | None = None,
    log_steps: int | None = None,
    log_values: Callable[[], dict[str, float]] | None = None,
    run: Any = None,
    prepare: Callable[[Any], Any] = lambda batch: batch,
    select: Callable[[int, Any], Any] | None = None,
    context: AbstractContextManager | None = None,
    bar_keys: Sequence[str] | None = None,
    desc: str = "training",
    progress: bool = True,
    verbose: bool = False,
    all_have: Callable[[bool], bool] | None = None,
) -> int:
    """The one training loop: steps `start` to `steps` (None: until `batches` runs out), each feeding the next batch
    (through `prepare`, then `select(i, batch)` for trainer i when given) to every trainer's `update(step, batch)`
    (inside `context`, e.g. autocast). A tqdm bar shows the first trainer's
    `last_metrics` (`bar_keys` of them); every `log_steps` steps `log_values()` goes to the wandb `run` (and is
    printed with `verbose`); at `save_steps`, `on_save(step)`. Every `checkpoint_steps` steps, at `save_steps` and
    at the end, every trainer's state is written atomically to the one file `checkpoint_path`
    (`save_checkpoint`) with the step, the batches consumed and `checkpoint_extra`. A stream that runs out ends the
    loop with a warning; in multi-process training `all_have(has_batch)` makes every rank stop when any runs out.
    Returns the number of steps done."""
    if checkpoint_steps is None:
        checkpoint_steps = max(1, steps // 10) if steps is not None else 0
    written = -1

    def checkpoint(step: int) -> None:
        nonlocal written
        # never a NaN checkpoint: the last good one stays
        check_finite(trainers, step - 1, None, checkpoint_path, written if written >= 0 else start, weights=True)
        save_checkpoint(checkpoint_path, trainers, step, consumed, checkpoint_extra)
        written = step

    indices = range(start, steps) if steps is not None else itertools.count(start)
    # shown at once (no delay): training is the phase a user waits for
    bar = progress_bar(indices, desc=desc, total=steps, enabled=progress, initial=start, delay=0,
                       leave=True)
    step = start
    for step in bar:
        batch = next(batches, None)
        if all_have is not None and not all_have(batch is not None):
            batch = None
        if batch is None:
            if steps is not None:
                warnings.warn(f"data ran out after {step} steps (of {steps})")
            break
        consumed += 1
        batch = prepare(batch)
        with context or nullcontext():
            for i, trainer in enumerate(trainers):
                trainer.update(step, batch if select is None else select(i, batch))
        check_finite(trainers, step, batch, checkpoint_path, written if written >= 0 else start)
        metrics = trainers[0].last_metrics
        shown = metrics if bar_keys is None else {key: metrics.get(key, 0.0) for key in bar_keys}
        bar.set_postfix({key: f"{value:.4g}" for key, value in shown.items()}, refresh=False)
        if log_steps and step % log_steps == 0 and log_values is not None:
            logged = log_values()
            if run is not None:
                run.log(logged, step=step)
            if verbose:
                bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logged.items()))
        if step + 1 in save_steps and on_save is not None:
            on_save(step + 1)
        if checkpoint_path and ((checkpoint_steps and (step + 1) % checkpoint_steps == 0) or step + 1 in save_steps):
            checkpoint(step + 1)
    else:
        step = steps if steps is not None else step
    bar.close()
    if checkpoint_path and written != step:
        checkpoint(step)
    if run is not None:
        run.finish()
    return step

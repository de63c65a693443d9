"""The one training loop of the package (`run_steps`, which `trainSAE` and `scae.train_scae_suite` run on), with
atomic resumable checkpoints (`resume_from_checkpoints` restores every trainer and replays the consumed batches, so a
resumed run ends with the same weights as an uninterrupted one) and offline-capable wandb runs (`start_wandb`)."""

from __future__ import annotations

import itertools
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from ..files import atomic_write

CHECKPOINT = "checkpoint.pt"


class Every:
    """`n in Every(k)` for n a positive multiple of k: upstream's int `save_steps` ("save every k steps")."""

    def __init__(self, every: int):
        self.every = every

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and step > 0 and step % self.every == 0


def resume_from_checkpoints(trainers: Sequence[Any], paths: Sequence[Path], batches: Iterator[Any],
                            resume: bool = True) -> dict[str, Any]:
    """With `resume`, restore each trainer from its checkpoint file and replay `batches` to where the interrupted
    run stood. Returns the checkpoint's step, batches_consumed and extra keys; `{"step": 0, "batches_consumed": 0}`
    without `resume` or when there is no checkpoint."""
    if not resume:
        return {"step": 0, "batches_consumed": 0}
    if not paths:
        raise ValueError("resume=True needs the save_dir of the interrupted run")
    states = []
    for path in paths:
        if not path.exists():
            return {"step": 0, "batches_consumed": 0}
        states.append(torch.load(path, map_location="cpu", weights_only=False))
    if len({state["step"] for state in states}) != 1:
        folder = Path(os.path.commonpath([str(path.parent) for path in paths]))
        raise ValueError(f"checkpoints in {folder} are at different steps: {[state['step'] for state in states]}")
    for trainer, state in zip(trainers, states):
        trainer.load_state_dict(state["trainer"])
    resumed = {key: value for key, value in states[0].items() if key != "trainer"}
    resumed.setdefault("batches_consumed", resumed["step"])  # one batch a step (older SCAE checkpoints)
    for _ in range(resumed["batches_consumed"]):
        next(batches)
    return resumed


def start_wandb(config: dict[str, Any], directory: Path | None, project: str = "dictionary_learning",
                entity: str | None = None, resume: bool = False):
    """A wandb run in the mode $WANDB_MODE names, offline when unset (no network needed; `wandb sync` uploads)."""
    import wandb

    return wandb.init(entity=entity, project=project, mode=os.environ.get("WANDB_MODE", "offline"), config=config,
                      dir=str(directory) if directory else None, resume="allow" if resume else None)


def run_steps(
    trainers: Sequence[Any],
    batches: Iterator[Any],
    steps: int | None,
    start: int = 0,
    consumed: int = 0,
    checkpoint_paths: Sequence[Path] = (),
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
) -> int:
    """The one training loop: steps `start` to `steps` (None: until `batches` runs out), each feeding the next batch
    (through `prepare`, then `select(i, batch)` for trainer i when given) to every trainer's `update(step, batch)`
    (inside `context`, e.g. autocast). A tqdm bar shows the first trainer's
    `last_metrics` (`bar_keys` of them); every `log_steps` steps `log_values()` goes to the wandb `run` (and is
    printed with `verbose`); at `save_steps`, `on_save(step)`. Every `checkpoint_steps` steps, at `save_steps` and
    at the end, each trainer's state is written atomically to its `checkpoint_paths` entry with the step, the
    batches consumed and `checkpoint_extra`. A stream that runs out ends the loop with a warning. Returns the
    number of steps done."""
    if checkpoint_steps is None:
        checkpoint_steps = max(1, steps // 10) if steps is not None else 0
    written = -1

    def checkpoint(step: int) -> None:
        nonlocal written
        for trainer, path in zip(trainers, checkpoint_paths):
            state = {"trainer": trainer.state_dict(), "step": step, "batches_consumed": consumed,
                     **(checkpoint_extra or {})}
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        written = step

    indices = range(start, steps) if steps is not None else itertools.count(start)
    bar = tqdm(indices, initial=start, total=steps, desc=desc, disable=not progress)
    step = start
    for step in bar:
        batch = next(batches, None)
        if batch is None:
            if steps is not None:
                warnings.warn(f"data ran out after {step} steps (of {steps})")
            break
        consumed += 1
        batch = prepare(batch)
        with context or nullcontext():
            for i, trainer in enumerate(trainers):
                trainer.update(step, batch if select is None else select(i, batch))
        metrics = trainers[0].last_metrics
        shown = metrics if bar_keys is None else {key: metrics.get(key, 0.0) for key in bar_keys}
        bar.set_postfix({key: f"{value:.4g}" for key, value in shown.items()}, refresh=False)
        if log_steps and step % log_steps == 0 and log_values is not None:
            logged = log_values()
            if run is not None:
                run.log(logged, step=step)
            if verbose:
                tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logged.items()))
        if step + 1 in save_steps and on_save is not None:
            on_save(step + 1)
        if checkpoint_paths and ((checkpoint_steps and (step + 1) % checkpoint_steps == 0) or step + 1 in save_steps):
            checkpoint(step + 1)
    else:
        step = steps if steps is not None else step
    bar.close()
    if checkpoint_paths and written != step:
        checkpoint(step)
    if run is not None:
        run.finish()
    return step

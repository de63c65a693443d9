"""trainSAE: train one or many dictionaries on one activation stream (each batch is collected once), on the one
training loop of the package (`run_steps`, which `scae.train_scae_suite` runs on too).

The loop: a progress bar with live metrics, optional wandb logging (offline mode works with no network), checkpoints
written atomically, and resuming (`resume_from_checkpoints`) that restores every trainer and replays the consumed
batches, so that a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from .dictionary import dictionary_class
from .files import atomic_write
from .trainers import TRAINER_CLASSES
from .trainers.trainer import SAETrainer, check_steps
from .utils import save_dictionary

CHECKPOINT = "checkpoint.pt"


def build_trainer(config: dict[str, Any]) -> SAETrainer:
    """A trainer from an upstream-style config dict: {"trainer": TopKTrainer, "dict_class": ..., ...}."""
    if not isinstance(config, dict):
        raise TypeError(f"a trainer config is a dict, got {type(config).__name__}")
    config = dict(config)
    trainer_class = config.pop("trainer", None)
    if isinstance(trainer_class, str):
        if trainer_class not in TRAINER_CLASSES:
            raise ValueError(f"unknown trainer {trainer_class!r}; known: {sorted(TRAINER_CLASSES)}")
        trainer_class = TRAINER_CLASSES[trainer_class]
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, SAETrainer)):
        raise ValueError(f"config['trainer'] must be a trainer class such as TopKTrainer, got {trainer_class!r}")
    if isinstance(config.get("dict_class"), str):
        config["dict_class"] = dictionary_class(config["dict_class"])
    accepted = set(inspect.signature(trainer_class.__init__).parameters) - {"self", "args", "kwargs"}
    if trainer_class.__init__ is not SAETrainer.__init__:  # subclasses forwarding **kwargs: include the parent's
        for base in trainer_class.__mro__[1:]:
            if issubclass(base, SAETrainer) and base is not SAETrainer:
                accepted |= set(inspect.signature(base.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(f"unknown {trainer_class.__name__} config keys {unknown}; accepted: {sorted(accepted)}")
    return trainer_class(**config)


def estimate_scales(batches: list[Any]) -> tuple[float, float]:
    """(scale_in, scale_out) that make the mean squared norm of inputs / targets equal their width."""
    def scale(tensors: list[torch.Tensor]) -> float:
        x = torch.cat([t.reshape(-1, t.shape[-1]).float() for t in tensors])
        return math.sqrt(x.shape[-1] / x.pow(2).sum(-1).mean().clamp_min(1e-12).item())

    if isinstance(batches[0], (tuple, list)):
        return scale([b[0] for b in batches]), scale([b[1] for b in batches])
    s = scale(batches)
    return s, s


def _scaled(batch: Any, scale_in: float, scale_out: float) -> Any:
    if (scale_in, scale_out) == (1.0, 1.0):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0] * scale_in, batch[1] * scale_out
    return batch * scale_in


def _save(trainer: SAETrainer, directory: Path, scales: tuple[float, float], run_config: dict[str, Any]) -> None:
    """The final (or intermediate) dictionary with normalisation folded in, in upstream's format."""
    ae = trainer.ae
    if scales != (1.0, 1.0):
        ae = copy.deepcopy(ae)
        ae.fold_scale(*scales)
    config = {"trainer": {**trainer.config, "normalization_scales": list(scales)}, **run_config}
    save_dictionary(ae, directory, config)


# ----------------------------------------------------------------------------------------------------------------
# the training loop


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
    steps: int,
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
    context: AbstractContextManager | None = None,
    bar_keys: Sequence[str] | None = None,
    desc: str = "training",
    progress: bool = True,
    verbose: bool = False,
) -> int:
    """The one training loop: steps `start` to `steps`, each feeding the next batch (through `prepare`) to every
    trainer's `update(step, batch)` (inside `context`, e.g. autocast). A tqdm bar shows the first trainer's
    `last_metrics` (`bar_keys` of them); every `log_steps` steps `log_values()` goes to the wandb `run` (and is
    printed with `verbose`); at `save_steps`, `on_save(step)`. Every `checkpoint_steps` steps, at `save_steps` and
    at the end, each trainer's state is written atomically to its `checkpoint_paths` entry with the step, the
    batches consumed and `checkpoint_extra`. A stream that runs out ends the loop with a warning. Returns the
    number of steps done."""
    checkpoint_steps = checkpoint_steps or max(1, steps // 10)
    written = -1

    def checkpoint(step: int) -> None:
        nonlocal written
        for trainer, path in zip(trainers, checkpoint_paths):
            state = {"trainer": trainer.state_dict(), "step": step, "batches_consumed": consumed,
                     **(checkpoint_extra or {})}
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        written = step

    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not progress)
    step = start
    for step in bar:
        batch = next(batches, None)
        if batch is None:
            warnings.warn(f"data ran out after {step} steps (of {steps})")
            break
        consumed += 1
        batch = prepare(batch)
        with context or nullcontext():
            for trainer in trainers:
                trainer.update(step, batch)
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
        if checkpoint_paths and ((step + 1) % checkpoint_steps == 0 or step + 1 in save_steps):
            checkpoint(step + 1)
    else:
        step = steps
    bar.close()
    if checkpoint_paths and written != step:
        checkpoint(step)
    if run is not None:
        run.finish()
    return step


# ----------------------------------------------------------------------------------------------------------------
# trainSAE


def trainSAE(
    data: Iterable[Any],
    trainer_configs: list[dict[str, Any]],
    steps: int,
    save_dir: str | Path | None = None,
    save_steps: list[int] | None = None,
    log_steps: int | None = None,
    use_wandb: bool = False,
    wandb_entity: str | None = None,
    wandb_project: str = "dictionary_learning",
    normalize_activations: bool = False,
    normalization_batches: int = 8,
    autocast_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    verbose: bool = False,
    resume: bool = False,
    checkpoint_steps: int | None = None,
    run_cfg: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[SAETrainer]:
    """Train every trainer in `trainer_configs` on the same batches from `data` for `steps` steps.

    data: an iterator of `[batch, d]` tensors, or of `(x, y)` pairs for transcoders (e.g. an ActivationBuffer).
    save_dir: each trainer saves to `save_dir/trainer_{i}/` (`ae.pt`, `model.safetensors`, `config.json`);
      `save_steps` adds intermediate saves under `checkpoints/step_{n}/`.
    checkpoint_steps: write a resumable checkpoint every this many steps (default: at save_steps and every
      max(1, steps // 10) steps when save_dir is given). `resume=True` continues from it, skipping the batches the
      interrupted run consumed, so the result equals an uninterrupted run on the same data and seeds.
    normalize_activations: scale inputs (and targets) to mean squared norm = width while training; the scale is
      folded into the saved weights, which work on raw activations.
    use_wandb: log to wandb (mode from $WANDB_MODE, default "offline": no network needed).
    Returns the trainers (their dictionaries are trained on the scaled activations if normalize_activations).
    """
    if not trainer_configs:
        raise ValueError("trainer_configs is empty: pass at least one trainer config")
    check_steps(steps)
    trainers = [build_trainer(config) for config in trainer_configs]
    save_dir = Path(save_dir) if save_dir is not None else None
    directories = [save_dir / f"trainer_{i}" for i in range(len(trainers))] if save_dir else []
    save_steps = sorted(set(save_steps or []))
    run_config = {"buffer": data.config} if hasattr(data, "config") else {}
    if run_cfg:
        run_config["run"] = dict(run_cfg)

    data = iter(data)
    checkpoints = [directory / CHECKPOINT for directory in directories]
    state = resume_from_checkpoints(trainers, checkpoints, data, resume)
    if resume and state["step"] == 0 and verbose:
        print(f"no checkpoint in {save_dir}; starting from step 0")
    start, consumed = state["step"], state["batches_consumed"]
    scales = tuple(state.get("scales", (1.0, 1.0)))
    if normalize_activations and start == 0:
        # the normalisation batches are not trained on (as upstream); a resumed run skips them too
        sample = [batch for _, batch in zip(range(normalization_batches), data)]
        if not sample:
            raise ValueError("data yielded no batches")
        scales = estimate_scales(sample)
        consumed += len(sample)

    def save_all(step: int) -> None:
        for trainer, directory in zip(trainers, directories):
            _save(trainer, directory / "checkpoints" / f"step_{step}", scales, run_config)

    def logged() -> dict[str, float]:
        return {f"trainer_{i}/{k}": v for i, t in enumerate(trainers)
                for k, v in t.get_logging_parameters().items() if isinstance(v, (int, float))}

    run = None
    if use_wandb:
        run = start_wandb({f"trainer_{i}": t.config for i, t in enumerate(trainers)} | run_config, save_dir,
                          project=wandb_project, entity=wandb_entity, resume=resume)
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
                if autocast_dtype != torch.float32 else None)
    run_steps(trainers, data, steps, start=start, consumed=consumed, checkpoint_paths=checkpoints,
              checkpoint_steps=checkpoint_steps, checkpoint_extra={"scales": list(scales)}, save_steps=save_steps,
              on_save=save_all, log_steps=log_steps, log_values=logged, run=run, context=autocast,
              prepare=lambda batch: _scaled(batch, *scales), bar_keys=("loss", "l0", "fvu"), progress=progress,
              verbose=verbose)
    for trainer, directory in zip(trainers, directories):
        _save(trainer, directory, scales, run_config)
    return trainers

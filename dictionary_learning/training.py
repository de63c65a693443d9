"""trainSAE: train one or many dictionaries on one activation stream (each batch is collected once).

Progress bar with live loss / L0 / FVU, optional wandb logging (offline mode works with no network), checkpoints
written atomically, and `resume=True` continuing from the last checkpoint so that a resumed run ends with the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from .dictionary import DICTIONARY_CLASSES
from .trainers import TRAINER_CLASSES
from .trainers.trainer import SAETrainer, check_steps
from .utils import atomic_write, save_dictionary

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
        name = config["dict_class"]
        if name not in DICTIONARY_CLASSES:
            raise ValueError(f"unknown dict_class {name!r}; known: {sorted(DICTIONARY_CLASSES)}")
        config["dict_class"] = DICTIONARY_CLASSES[name]
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
    if save_dir is not None and checkpoint_steps is None:
        checkpoint_steps = max(1, steps // 10)
    save_steps = sorted(set(save_steps or []))
    run_config = {"buffer": data.config} if hasattr(data, "config") else {}
    if run_cfg:
        run_config["run"] = dict(run_cfg)

    data = iter(data)
    start_step, consumed, scales = 0, 0, (1.0, 1.0)
    if resume:
        if save_dir is None:
            raise ValueError("resume=True needs the save_dir of the interrupted run")
        states = []
        for directory in directories:
            path = directory / CHECKPOINT
            if not path.exists():
                states = []
                break
            states.append(torch.load(path, map_location="cpu", weights_only=False))
        if states:
            if len({s["step"] for s in states}) != 1:
                raise ValueError(f"checkpoints in {save_dir} are at different steps: {[s['step'] for s in states]}")
            for trainer, state in zip(trainers, states):
                trainer.load_state_dict(state["trainer"])
            start_step, consumed, scales = states[0]["step"], states[0]["batches_consumed"], tuple(states[0]["scales"])
            for _ in range(consumed):  # replay the data stream to where the interrupted run stood
                next(data)
        elif verbose:
            print(f"no checkpoint in {save_dir}; starting from step 0")

    if normalize_activations and start_step == 0:
        # the normalisation batches are not trained on (as upstream); a resumed run skips them too
        sample = [batch for _, batch in zip(range(normalization_batches), data)]
        if not sample:
            raise ValueError("data yielded no batches")
        scales = estimate_scales(sample)
        consumed += len(sample)

    run = None
    if use_wandb:
        import wandb

        run = wandb.init(entity=wandb_entity, project=wandb_project, mode=os.environ.get("WANDB_MODE", "offline"),
                         config={f"trainer_{i}": t.config for i, t in enumerate(trainers)} | run_config,
                         dir=str(save_dir) if save_dir else None, resume="allow" if resume else None)

    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
                if autocast_dtype != torch.float32 else nullcontext())

    def checkpoint(step: int) -> None:
        for trainer, directory in zip(trainers, directories):
            state = {"trainer": trainer.state_dict(), "step": step, "batches_consumed": consumed,
                     "scales": list(scales)}
            atomic_write(directory / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc="training", disable=not progress)
    step = start_step
    for step in bar:
        batch = next(data, None)
        if batch is None:
            warnings.warn(f"data ran out after {step} steps (of {steps})")
            break
        consumed += 1
        batch = _scaled(batch, *scales)
        with autocast:
            for trainer in trainers:
                trainer.update(step, batch)
        metrics = trainers[0].last_metrics
        bar.set_postfix(loss=f"{metrics.get('loss', 0):.4g}", l0=f"{metrics.get('l0', 0):.1f}",
                        fvu=f"{metrics.get('fvu', 0):.3f}", refresh=False)
        if log_steps and step % log_steps == 0:
            logged = {f"trainer_{i}/{k}": v for i, t in enumerate(trainers)
                      for k, v in t.get_logging_parameters().items() if isinstance(v, (int, float))}
            if run is not None:
                run.log(logged, step=step)
            if verbose:
                tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logged.items()))
        if save_dir is not None:
            if step + 1 in save_steps:
                for trainer, directory in zip(trainers, directories):
                    _save(trainer, directory / "checkpoints" / f"step_{step + 1}", scales, run_config)
            if (step + 1) % checkpoint_steps == 0 or step + 1 in save_steps:
                checkpoint(step + 1)
    else:
        step = steps
    bar.close()

    if save_dir is not None:
        for trainer, directory in zip(trainers, directories):
            _save(trainer, directory, scales, run_config)
        checkpoint(step)
    if run is not None:
        run.finish()
    return trainers

"""The one training loop of the package (`run_steps`, which `trainSAE`, `scae.train_scae_suite` and
the founding `trainSAE` run on) and the rooms it drives: `Checkpoints` (atomic resumable
checkpoints: `resume_from_checkpoints` restores every trainer and replays the consumed batches, so a
resumed run ends with the same weights as an uninterrupted one), `Saves` (upstream's intermediate
saves) and `logger.Logger` (bar, wandb, printed logs)."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..files import atomic_write, error_summary
from .logger import Logger

CHECKPOINT = "checkpoint.pt"


class Every:
    """`n in Every(k)` for n a positive multiple of k: upstream's int `save_steps` ("save every
    k steps")."""

    def __init__(self, every: int):
        self.every = every

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and step > 0 and step % self.every == 0


def save_checkpoint(path: Path, trainers: Sequence[Any], step: int, batches_consumed: int,
                    extra: dict[str, Any] | None = None) -> None:
    """Every trainer's state, the step and the batches consumed, in one file written atomically: a
    crash (or a full disk) at any moment leaves the previous complete checkpoint or the new one,
    never trainers at different steps."""
    state = {"trainers": [trainer.state_dict() for trainer in trainers], "step": step,
             "batches_consumed": batches_consumed,
             "configs": [_config(trainer) for trainer in trainers], **(extra or {})}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _config(trainer: Any) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint, as JSON text values: a
    `trainers.Trainer`'s `cfg.compared_on_resume()` (every hyperparameter), else the trainer's whole
    `config` (SCAE fine-tuning and upstream-style trainers)."""
    cfg = getattr(trainer, "cfg", None)
    config = (cfg.compared_on_resume() if hasattr(cfg, "compared_on_resume")
              else getattr(trainer, "config", None))
    return {key: json.dumps(value, sort_keys=True, default=str)
            for key, value in (config or {}).items()}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file's contents, loaded with `weights_only=True` (tensors and plain types only:
    a crafted file cannot run code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot load checkpoint {str(path)!r}: it is corrupt, or holds objects "
                         "other than tensors and plain types, which are refused because unpickling "
                         f"them could run code ({error_summary(error)})") from error


def resume_from_checkpoints(trainers: Sequence[Any], path: Path | None, batches: Iterator[Any],
                            resume: bool = True) -> dict[str, Any]:
    """With `resume`, restore every trainer from the checkpoint file `path` (`save_checkpoint`'s)
    and replay `batches` to where the interrupted run stood. Returns the checkpoint's step,
    batches_consumed and extra keys; `{"step": 0, "batches_consumed": 0}` without `resume` or when
    there is no checkpoint."""
    if not resume:
        return {"step": 0, "batches_consumed": 0}
    if not path:
        raise ValueError("resume=True needs the save_dir of the interrupted run")
    if not Path(path).exists():
        return {"step": 0, "batches_consumed": 0}
    resumed = load_checkpoint(Path(path))
    states = resumed.pop("trainers", None)
    if not isinstance(states, list) or "configs" not in resumed:
        raise ValueError(f"{str(path)!r} is not a checkpoint of this version of the toolkit (no "
                         "trainers and configs in it): start the run afresh, without resume")
    if len(states) != len(trainers):
        raise ValueError(f"checkpoint {str(path)!r} holds {len(states)} trainers, this run has "
                         f"{len(trainers)}")
    for i, (trainer, saved) in enumerate(zip(trainers, resumed.pop("configs"))):
        now = _config(trainer)
        changed = sorted(key for key in set(saved) | set(now) if saved.get(key) != now.get(key))
        if changed:  # the checkpoint's optimizer and schedule would silently keep the old values
            raise ValueError(f"trainer {i} is configured differently from the checkpoint it would "
                             "resume: "
                             + "; ".join(f"{key}: {saved.get(key)} in the checkpoint, "
                                         f"{now.get(key)} now"
                                         for key in changed))
    for trainer, state in zip(trainers, states):
        trainer.load_state_dict(state)
    for _ in range(resumed["batches_consumed"]):
        next(batches)
    return resumed


def _largest_norm(batch: Any) -> float | None:
    """The largest vector norm in a batch (a tensor, a pair or a dict of them), for a divergence
    message."""
    tensors = ([batch] if isinstance(batch, torch.Tensor)
               else list(batch.values()) if isinstance(batch, dict)
               else list(batch) if isinstance(batch, (tuple, list)) else [])
    norms = [t.double().norm(dim=-1).max().item() for t in tensors
             if isinstance(t, torch.Tensor) and t.numel()]
    return max(norms) if norms else None


def check_finite(trainers: Sequence[Any], step: int, batch: Any, checkpoint: Path | None,
                 checkpointed: int, weights: bool = False) -> None:
    """Stop a run whose loss (or, with `weights`, a parameter) stopped being finite, naming the
    step, the trainer and the likely causes, before anything of it is saved: the last checkpoint and
    earlier saves stay as they were, and `resume=True` continues from that checkpoint once the cause
    is fixed."""
    for i, trainer in enumerate(trainers):
        loss = (getattr(trainer, "last_metrics", None) or {}).get("loss")
        loss = (float(loss)
                if isinstance(loss, (int, float, torch.Tensor)) and not isinstance(loss, bool)
                else None)
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
                  "activations too large" + (f" (this batch's largest norm is {norm:.3g})" if norm
                                             else ""),
                  "float16 autocast overflowing (use bfloat16)", "a NaN hyperparameter"]
        kept = (f"the checkpoint of step {checkpointed} in {str(checkpoint.parent)!r} is intact: "
                "fix the cause and resume=True continues from "
                "it" if checkpoint is not None and checkpointed > 0
                else "no checkpoint of this run was written")
        raise FloatingPointError(f"training diverged at step {step}: trainer {i} "
                                 f"({type(trainer).__name__}) stopped being finite ({bad}). Likely "
                                 f"causes: {'; '.join(causes)}. Nothing of this step was saved; "
                                 f"{kept}.")



class Checkpoints:
    """The run's resumable state in the one file `path` (None: none), written atomically: every
    trainer's state, the step, the batches consumed and `extra` (e.g. the normalisation scales).
    Written every `every` steps (None: a tenth of a run of `steps` steps), at each step in `at` and
    at the end, unless `writes` is False (a data-parallel rank other than 0 only resumes from it);
    never with NaN / inf weights (the last good checkpoint stays)."""

    def __init__(self, path: Path | None, every: int | None = None, steps: int | None = None,
                 at: Sequence[int] | Every = (), writes: bool = True):
        self.path, self.at, self.writes = path, at, writes
        self.every = every if every is not None else (max(1, steps // 10) if steps is not None
                                                      else 0)
        self.extra: dict[str, Any] = {}
        self.last = 0  # the step of the last good checkpoint, or the step the run started from

    def resume(self, trainers: Sequence[Any], batches: Iterator[Any],
               resume: bool) -> dict[str, Any]:
        """With `resume`, every trainer restored from `path` and `batches` replayed to where the run
        stood; returns the checkpoint's step, batches_consumed and extra values (step 0
        without one)."""
        state = resume_from_checkpoints(trainers, self.path, batches, resume)
        self.last = state["step"]
        return state

    @property
    def written(self) -> Path | None:
        """The file this process writes (None when it writes none)."""
        return self.path if self.writes else None

    def due(self, step: int) -> bool:
        return self.written is not None and bool((self.every and step % self.every == 0)
                                                 or step in self.at)

    def write(self, trainers: Sequence[Any], step: int, consumed: int) -> None:
        if self.written is None or self.last == step:
            return
        check_finite(trainers, step - 1, None, self.path, self.last, weights=True)
        save_checkpoint(self.path, trainers, step, consumed, self.extra)
        self.last = step


class Saves:
    """Upstream's intermediate saves: at each step in `at` (a list of steps, or `Every(n)`), trainer
    i's dictionary (its normalisation folded in by `scales`, a `feed.Scales`, when given) to
    `folders[i]/checkpoints/ae_{step}.pt` as a state dict."""

    def __init__(self, folders: Sequence[Path], at: Sequence[int] | Every = (), scales: Any = None):
        self.folders, self.at, self.scales = list(folders), at, scales

    def due(self, step: int) -> bool:
        return bool(self.folders) and step in self.at

    def write(self, trainers: Sequence[Any], step: int) -> None:
        for i, (trainer, folder) in enumerate(zip(trainers, self.folders)):
            ae = trainer.ae if self.scales is None else self.scales.folded(trainer.ae, i)
            state = ae.saved_state_dict()
            atomic_write(folder / "checkpoints" / f"ae_{step}.pt",
                         lambda tmp: torch.save(state, tmp))


def _update_all(trainers: Sequence[Any], step: int, batch: Any, feed: Any) -> None:
    for i, trainer in enumerate(trainers):
        trainer.update(step, batch if feed is None else feed.select(i, batch))


def run_steps(
    trainers: Sequence[Any],
    batches: Iterator[Any],
    steps: int | None,
    start: int = 0,
    consumed: int = 0,
    *,
    checkpoints: Checkpoints | None = None,
    saves: Saves | None = None,
    logger: Logger | None = None,
    feed: Any = None,
    context: AbstractContextManager | None = None,
    all_have: Callable[[bool], bool] | None = None,
) -> int:
    """The one training loop: steps `start` to `steps` (None: until `batches` runs out), each giving
    the next batch to every trainer's `update(step, batch)` inside `context` (e.g. autocast); a
    `feed` (`feed.Feed`) scales the batch and gives trainer i its part. After each step the `logger`
    shows and logs metrics, `saves` writes the intermediate dictionaries it is due, and
    `checkpoints` the resumable state it is due (and at the end). A stream that runs out ends the
    loop with a warning; in multi-process training `all_have(has_batch)` makes every rank stop when
    any runs out. Every step's losses are checked finite (`check_finite`). Returns the number of
    steps done."""
    checkpoints = checkpoints or Checkpoints(None)
    logger = logger or Logger()
    # upstream saves the initial weights when asked
    if saves is not None and start == 0 and saves.due(0):
        saves.write(trainers, 0)
    bar = logger.bar(range(start, steps) if steps is not None else itertools.count(start), steps,
                     start)
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
        batch = feed.prepare(batch) if feed is not None else batch
        with context or nullcontext():
            _update_all(trainers, step, batch, feed)
        check_finite(trainers, step, batch, checkpoints.written, checkpoints.last)
        logger.step(bar, trainers, step)
        if saves is not None and saves.due(step + 1):
            saves.write(trainers, step + 1)
        if checkpoints.due(step + 1):
            checkpoints.write(trainers, step + 1, consumed)
    else:
        step = steps if steps is not None else step
    bar.close()
    checkpoints.write(trainers, step, consumed)
    logger.finish()
    return step

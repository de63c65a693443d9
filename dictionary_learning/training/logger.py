"""What a training run shows and logs: `Logger` (the progress bar with live metrics, the logged
values to wandb and, with `verbose`, printed) and `start_wandb` (a run offline unless $WANDB_MODE
says otherwise)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..progress import progress_bar


def start_wandb(config: dict[str, Any], directory: Path | None,
                project: str = "dictionary_learning", entity: str | None = None,
                resume: bool = False):
    """A wandb run in the mode $WANDB_MODE names, offline when unset (no network needed;
    `wandb sync` uploads)."""
    import wandb

    return wandb.init(entity=entity, project=project, mode=os.environ.get("WANDB_MODE", "offline"),
                      config=config, dir=str(directory) if directory else None,
                      resume="allow" if resume else None)


class Logger:
    """The progress bar (`desc`, showing `keys` of the first trainer's `last_metrics`; all of them
    when None) and, every `every` steps, the logged values to the wandb `run` and, with `verbose`,
    printed. The logged values are each trainer's `get_logging_parameters()` named
    `trainer_{name}/{key}` by `names`, or the first trainer's `last_metrics` when `names` is
    None."""

    def __init__(self, desc: str = "training", progress: bool = True,
                 keys: Sequence[str] | None = None, every: int | None = None, run: Any = None,
                 verbose: bool = False, names: Sequence[Any] | None = None):
        self.desc, self.progress, self.keys, self.every, self.run = desc, progress, keys, every, run
        self.verbose, self.names = verbose, names

    def bar(self, indices: Iterable[int], steps: int | None, start: int) -> Any:
        # shown at once (no delay): training is the phase a user waits for
        return progress_bar(indices, desc=self.desc, total=steps, enabled=self.progress,
                            initial=start, delay=0, leave=True)

    def values(self, trainers: Sequence[Any]) -> dict[str, float]:
        if self.names is None:
            return dict(trainers[0].last_metrics)
        return {f"trainer_{name}/{key}": value for name, trainer in zip(self.names, trainers)
                for key, value in trainer.get_logging_parameters().items()
                if isinstance(value, (int, float))}

    def step(self, bar: Any, trainers: Sequence[Any], step: int) -> None:
        metrics = trainers[0].last_metrics
        shown = metrics if self.keys is None else {key: metrics.get(key, 0.0) for key in self.keys}
        bar.set_postfix({key: f"{value:.4g}" for key, value in shown.items()}, refresh=False)
        if not self.every or step % self.every != 0 or (self.run is None and not self.verbose):
            return
        logged = self.values(trainers)
        if self.run is not None:
            self.run.log(logged, step=step)
        if self.verbose:
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logged.items()))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()

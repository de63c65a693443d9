"""Upstream dictionary_learning's training entry points, as thin adapters over the package's own:
`trainSAE` (both of upstream's call forms: upstream's positional signature onto
`train.train_dictionaries`, the founding (December 2023) README's onto `train_autoencoder`),
`get_norm_factor`, `log_stats` and `new_wandb_process` with upstream's signatures."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from queue import Empty
from typing import Any, Iterable, Sequence

import torch

from ..checks import integer
from ..dictionary import AutoEncoder
from ..progress import progress_bar
from ..trainers import StandardTrainer
from ..utils import save_dictionary
from .feed import activation_scales
from .logger import Logger
from .loop import Every, Saves, run_steps
from .train import train_dictionaries

UNTIL_EXHAUSTED = 2**62  # the trainer's step budget when training runs until the data ends


def get_norm_factor(data: Iterable[Any], steps: int) -> float:
    """Upstream's norm factor: the square root of the mean squared norm of the activations (averaged
    over the first `steps` + 1 batches drawn from `data`); dividing by it gives unit mean squared
    norm (Gao et al. 2024)."""
    batches = list(progress_bar(itertools.islice(data, steps + 1), desc="Calculating norm factor",
                                total=steps + 1, delay=0, leave=True))
    if not batches:
        raise ValueError("get_norm_factor: data yielded no batches")
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    return 1.0 / activation_scales(batches, "unit")[0]


@torch.no_grad()
def log_stats(trainers: Sequence[Any], step: int, act: Any, activations_split_by_head: bool,
              transcoder: bool, log_queues: Sequence[Any] = (),
              verbose: bool = False) -> list[dict[str, float]]:
    """Upstream's per-trainer statistics on one batch: L0, the fraction of variance explained (SAEs)
    and each trainer's logging parameters; each dict goes to `log_queues[i]` when given
    (see `new_wandb_process`). Unlike upstream this does not call `trainer.loss`, so logging never
    changes a trainer's dead-feature counts."""
    logs = []
    for i, trainer in enumerate(trainers):
        x, y = act if isinstance(act, (tuple, list)) else (act, act)
        if activations_split_by_head:  # [batch, n_heads, d_head]: trainer i reads head i
            x, y = x[..., i, :], y[..., i, :]
        param = next(trainer.ae.parameters())
        x, y = x.to(param.device, param.dtype), y.to(param.device, param.dtype)
        y_hat, f = trainer.ae(x, output_features=True)
        log = {key: value for key, value in trainer.get_logging_parameters().items()}
        log["l0"] = (f != 0).float().sum(dim=-1).mean().item()
        if not transcoder and not trainer.ae.transcoder:
            log["frac_variance_explained"] = (1 - (y - y_hat).var(dim=0).sum()
                                              / y.var(dim=0).sum()).item()
        log = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in log.items()}
        if verbose:
            print(f"Step {step}, trainer {i}: " + ", ".join(f"{k} = {v:.4g}" for k, v in log.items()
                                                            if isinstance(v, (int, float))))
        if log_queues:
            log_queues[i].put(log)
        logs.append(log)
    return logs


def new_wandb_process(config: dict[str, Any], log_queue: Any, entity: str | None,
                      project: str | None) -> None:
    """Upstream's wandb worker: one run named `config["wandb_name"]` logging every dict put on
    `log_queue` until "DONE" arrives (mode from $WANDB_MODE, default offline: no network needed)."""
    import wandb

    wandb.init(entity=entity or None, project=project or "dictionary_learning", config=config,
               name=config.get("wandb_name"), mode=os.environ.get("WANDB_MODE", "offline"))
    while True:
        try:
            log = log_queue.get(timeout=1)
        except Empty:
            continue
        if log == "DONE":
            break
        wandb.log(log)
    wandb.finish()


def train_autoencoder(
    activations: Iterable[Any],
    activation_dim: int,
    dictionary_size: int,
    lr: float,
    sparsity_penalty: float,
    entropy: bool = False,
    steps: int | None = None,
    warmup_steps: int = 1000,
    resample_steps: int | None = 25000,
    save_steps: int | None = None,
    save_dir: str | Path | None = None,
    log_steps: int | None = 1000,
    device: str = "cpu",
    *,
    seed: int | None = None,
    progress: bool = True,
) -> AutoEncoder:
    """The founding README's `trainSAE`: one `AutoEncoder` trained as in Anthropic's Towards
    Monosemanticity (untied weights, unit-norm decoder through constrained Adam, lr warmup over
    `warmup_steps`, dead neurons resampled every `resample_steps`) with an L1 penalty, or the
    entropy of the normalised codes when `entropy`.

    activations: batches `[batch, activation_dim]`, or `(x, y)` pairs (an "in_to_out" buffer: a
    transcoder). The loss is the founding one: the squared error averaged over batch and output
    width plus `sparsity_penalty` times the penalty (so it is `StandardTrainer` with `l1_penalty =
    sparsity_penalty * output width`).
    steps: None trains until `activations` runs out. save_steps: every that many steps, the weights
    go to `save_dir/checkpoints/ae_{step}.pt`; the final dictionary is saved to `save_dir`
    (ae.pt + config.json).
    log_steps: print the losses every that many steps. Returns the trained AutoEncoder.
    """
    if isinstance(activations, (str, bytes)):
        raise TypeError("activations must be an iterable of activation batches (e.g. an "
                        "ActivationBuffer), got a string")
    data = iter(activations)
    first = next(data, None)
    if first is None:
        raise ValueError("activations yielded no batches")
    x, y = first if isinstance(first, (tuple, list)) else (first, first)
    if x.shape[-1] != activation_dim:
        raise ValueError(f"activation_dim={activation_dim} but the activations have width "
                         f"{x.shape[-1]}")
    d_out = y.shape[-1]
    trainer = StandardTrainer(
        steps=steps if steps is not None else UNTIL_EXHAUSTED, activation_dim=activation_dim,
        dict_size=dictionary_size, lr=lr, l1_penalty=sparsity_penalty * d_out,
        warmup_steps=warmup_steps, sparsity_warmup_steps=None, resample_steps=resample_steps,
        entropy=entropy, seed=seed, device=device, output_dim=d_out,
        transcoder=isinstance(first, (tuple, list)))
    save_dir = Path(save_dir) if save_dir is not None else None
    saves = Saves([save_dir] if save_dir is not None else [],
                  Every(save_steps) if save_steps else ())
    logger = Logger(desc="trainSAE", progress=progress, every=log_steps, verbose=bool(log_steps))
    run_steps([trainer], itertools.chain([first], data), steps, saves=saves, logger=logger)
    if save_dir is not None:
        save_dictionary(trainer.ae, save_dir, {"trainer": trainer.config})
    return trainer.ae


# upstream's trainSAE(data, ...) positional parameters after `data`, in upstream's order
UPSTREAM_ORDER = ("trainer_configs", "steps", "use_wandb", "wandb_entity", "wandb_project",
                  "save_steps", "save_dir", "log_steps", "activations_split_by_head", "transcoder",
                  "run_cfg", "normalize_activations", "verbose", "device", "autocast_dtype",
                  "backup_steps")
FOUNDING_KEYWORDS = {"activation_dim", "dictionary_size", "dict_size", "lr", "sparsity_penalty",
                     "entropy", "warmup_steps", "resample_steps"}


def trainSAE(data: Iterable[Any], *args: Any, **kwargs: Any) -> Any:
    """Train dictionaries on an activation stream. Two call forms, told apart by their arguments:

    - `trainSAE(data, trainer_configs, steps, use_wandb=False, ..., backup_steps=None, **options)`
      (upstream since 2024, with upstream's parameters in upstream's order, and this toolkit's
      `RunOptions` by keyword): every trainer config (`{"trainer": TopKTrainer, "activation_dim":
      ..., ...}`) trains on the same batches; returns the trainers. See `train.train_dictionaries`
      and `train.RunOptions`.
    - `trainSAE(activations, activation_dim, dictionary_size, lr=, sparsity_penalty=, entropy=False,
      steps=None, ...)` (the founding README of December 2023): one `AutoEncoder` trained by the
      original recipe (unit-norm decoder through constrained Adam, L1 or entropy penalty, lr warmup,
      dead-neuron resampling); returns the AutoEncoder. See `train_autoencoder`.
    """
    founding = bool(args) and isinstance(args[0], int) and not isinstance(args[0], bool)
    if founding or FOUNDING_KEYWORDS & set(kwargs):
        return train_autoencoder(data, *args, **kwargs)
    if len(args) > len(UPSTREAM_ORDER):
        raise TypeError(f"trainSAE takes at most {len(UPSTREAM_ORDER) + 1} positional arguments "
                        f"(data, {', '.join(UPSTREAM_ORDER)}), got {len(args) + 1}")
    named = dict(zip(UPSTREAM_ORDER, args))
    twice = sorted(set(named) & set(kwargs))
    if twice:
        raise TypeError(f"trainSAE got multiple values for {twice}")
    named.update(kwargs)
    missing = [name for name in ("trainer_configs", "steps") if name not in named]
    if missing:
        raise TypeError(f"trainSAE is missing the argument(s) {missing}: trainSAE(data, "
                        "trainer_configs, steps, ...)")
    # transcoders are recognised from their dictionaries and (x, y) batches
    named.pop("transcoder", None)
    backup_steps = named.pop("backup_steps", None)  # upstream's name for checkpoint_steps
    if backup_steps is not None:
        integer("backup_steps", backup_steps)
        if named.get("checkpoint_steps") is None:
            named["checkpoint_steps"] = backup_steps
    return train_dictionaries(data, named.pop("trainer_configs"), named.pop("steps"), **named)

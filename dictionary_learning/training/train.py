"""trainSAE: train one or many dictionaries on one activation stream (each batch is collected once), on the one
training loop (`loop.run_steps`): a progress bar with live metrics, optional wandb logging (offline mode works with no
network), atomic checkpoints and exact resume. The founding README's call form is dispatched to `upstream.py`."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable

import torch

from ..checks import finite_hyperparameters, integer
from ..files import atomic_write, check_writable_folder, writer_lock
from ..trainers import TRAINER_CLASSES
from ..trainers.base import Trainer
from ..trainers.trainer import SAETrainer
from ..utils import save_dictionary
from .distributed import DataParallel, check_mode, check_same_on_every_rank
from .end_to_end import EndToEnd
from .loop import CHECKPOINT, Every, resume_from_checkpoints, run_steps, start_wandb
from .upstream import activation_scales, train_autoencoder

NORMALIZATIONS = (False, True, "unit", "d_model")


def build_trainer(config: dict[str, Any]) -> SAETrainer:
    """A trainer from an upstream-style config dict: {"trainer": TopKTrainer, "dict_class": ..., ...} (the other
    keys are the trainer's config fields; `initial_weights`, a saved dictionary, starts it from those weights)."""
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
    if issubclass(trainer_class, Trainer):
        accepted = {field.name for field in dataclasses.fields(trainer_class.Config)}
    else:  # a subclass of upstream's SAETrainer: its constructor's parameters
        accepted = set(inspect.signature(trainer_class.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(f"unknown {trainer_class.__name__} config keys {unknown}; accepted: {sorted(accepted)}")
    finite_hyperparameters(trainer_class.__name__, config)
    return trainer_class(**config)


def prepare_data_parallel(trainers: list[SAETrainer], sync: DataParallel) -> None:
    """Give every trainer the collectives and rank 0's initial weights; refuse what would make ranks diverge."""
    configs = [{key: value for key, value in trainer.config.items() if key != "device"} for trainer in trainers]
    check_same_on_every_rank(sync, configs, "trainer configs")  # (each rank has its own GPU)
    for trainer in trainers:
        if getattr(trainer, "resample_steps", None) is not None:
            raise ValueError(f"{type(trainer).__name__} with resample_steps={trainer.resample_steps} cannot train "
                             f"data-parallel: each rank would resample dead neurons from its own batch, and the ranks' "
                             f"weights would diverge; use resample_steps=None or distributed='trainers'")
        if not trainer.exact_data_parallel:
            warnings.warn(f"{type(trainer).__name__} under distributed='data' computes some statistic per rank (the "
                          f"annealed penalty's rescaling, from each rank's own losses), so it does not equal one "
                          f"process on the global batches exactly; the weights stay identical across ranks")
        trainer.distributed = sync
        sync.broadcast_module(trainer.ae)


def _save_steps(save_steps: Any) -> Any:
    if save_steps is None:
        return ()
    if isinstance(save_steps, int) and not isinstance(save_steps, bool):
        if save_steps <= 0:
            raise ValueError(f"save_steps must be a positive int or a list of steps, got {save_steps}")
        return Every(save_steps)
    return sorted({integer("each of save_steps", step, low=0) for step in save_steps})


def _scaled(batch: Any, scale_in: float, scale_out: float) -> Any:
    if (scale_in, scale_out) == (1.0, 1.0):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0] * scale_in, batch[1] * scale_out
    return batch * scale_in


class Routing:
    """Which entry of dict batches (many hook points from one pass: `{name: batch}`) each trainer trains on: the
    one its config's `submodule_name` (upstream's key) names."""

    def __init__(self, trainers: list[SAETrainer]):
        self.names = [trainer.config.get("submodule_name") for trainer in trainers]
        self.checked = False

    def check(self, available: Iterable[str]) -> None:
        available = list(available)
        for i, name in enumerate(self.names):
            if name is None:
                raise ValueError(f"trainer {i}'s config has no submodule_name: with batches from many hook points "
                                 f"({available}) each trainer config names the one it trains on, e.g. "
                                 f"submodule_name={available[0]!r}")
            if name not in available:
                raise ValueError(f"trainer {i}'s submodule_name={name!r} is not one of the hook points the data "
                                 f"yields: {available}")
        self.checked = True

    def __call__(self, i: int, batch: Any) -> Any:
        """Trainer i's part of a batch (`prepare` has checked dict batches' names)."""
        return batch[self.names[i]] if isinstance(batch, dict) else batch


def _save(trainer: SAETrainer, directory: Path, scales: tuple[float, float], run_config: dict[str, Any]) -> None:
    """The final (or intermediate) dictionary with normalisation folded in, in upstream's format."""
    ae = trainer.ae
    if scales != (1.0, 1.0):
        ae = copy.deepcopy(ae)
        ae.fold_scale(*scales)
    norm_factor = {"norm_factor": 1 / scales[0]} if scales != (1.0, 1.0) else {}
    config = {"trainer": {**trainer.config, **norm_factor, "normalization_scales": list(scales)}, **run_config}
    save_dictionary(ae, directory, config)


def _save_intermediate(trainer: SAETrainer, path: Path, scales: tuple[float, float]) -> None:
    """An intermediate save as upstream writes it: `checkpoints/ae_{step}.pt`, the state dict (scales folded in)."""
    ae = trainer.ae
    if scales != (1.0, 1.0):
        ae = copy.deepcopy(ae)
        ae.fold_scale(*scales)
    state = ae.saved_state_dict()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def train_dictionaries(
    data: Iterable[Any],
    trainer_configs: list[dict[str, Any]],
    steps: int | None,
    use_wandb: bool = False,
    wandb_entity: str | None = None,
    wandb_project: str | None = None,
    save_steps: list[int] | int | None = None,
    save_dir: str | Path | None = None,
    log_steps: int | None = None,
    activations_split_by_head: bool = False,
    transcoder: bool = False,
    run_cfg: dict[str, Any] | None = None,
    normalize_activations: bool | str = False,
    verbose: bool = False,
    device: str | None = None,
    autocast_dtype: torch.dtype = torch.float32,
    backup_steps: int | None = None,
    *,
    normalization_batches: int = 8,
    resume: bool = False,
    checkpoint_steps: int | None = None,
    progress: bool = True,
    distributed: str | None = None,
    end_to_end: dict[str, Any] | None = None,
    keep_checkpoint: bool = False,
) -> list[SAETrainer]:
    """Train every trainer in `trainer_configs` on the same batches from `data` for `steps` steps (None: until the
    data runs out). The parameters up to `backup_steps` are upstream's, in upstream's order.

    data: an iterator of `[batch, d]` tensors, or of `(x, y)` pairs for transcoders (e.g. an ActivationBuffer);
      with `activations_split_by_head`, `[batch, n_heads, d_head]` tensors and trainer i trains on head i. Dict
      batches `{name: tensor or (x, y)}` (a buffer over many hook points, or an activation cache) train each trainer
      on the entry its config's `submodule_name` names (a clear error if it names none or an unknown one); each
      entry then has its own normalisation factor.
    save_dir: each trainer saves to `save_dir/trainer_{i}/` (`ae.pt`, `model.safetensors`, `config.json`);
      `save_steps` (a list of steps, or an int: every that many steps) adds upstream's intermediate saves
      `checkpoints/ae_{n}.pt` (the state dict after n steps).
    checkpoint_steps (upstream: backup_steps): write a resumable `save_dir/checkpoint.pt` (every trainer's state in
      one file, written atomically) every this many steps (default: at
      save_steps and every max(1, steps // 10) steps when save_dir is given). `resume=True` continues from it,
      skipping the batches the interrupted run consumed, so the result equals an uninterrupted run. Once the
      dictionaries are saved at the end, the checkpoint is deleted unless `keep_checkpoint` (it holds every
      trainer's optimizer state: several times the dictionaries' size).
    normalize_activations: True or "unit" (upstream): scale inputs (and targets) by one factor each so their mean
      squared norm is 1 while training; "d_model": to their width instead. The factor is estimated on the first
      `normalization_batches` batches (not trained on) and folded into the saved weights, which work on raw
      activations; config.json records it as upstream's `norm_factor`.
    use_wandb: log to one wandb run (mode from $WANDB_MODE, default "offline": no network needed).
    distributed: in a torch.distributed run (`torchrun`, then `training.init_distributed()`), "data": every rank
      trains every dictionary on its own share of each global batch (`data` yields this rank's share, e.g. a
      buffer over `training.shard(texts)` or a cache reader with rank / world_size), gradients and dead-feature
      statistics are combined so the run equals one process on the global batches; rank 0 writes the checkpoint
      and the dictionaries, and resume works as in one process. "trainers": rank r builds and trains trainers r,
      r + world_size, ... on all of `data` (the same stream on every rank), saving its own `trainer_{i}` folders
      and `checkpoint.rank{r}.pt`; it returns only its own trainers. save_dir must be a folder every rank sees.
    end_to_end: train every dictionary on the model's downstream loss (`training.EndToEnd`): a dict of its
      arguments, `{"model": lm, "hooks": (point,) or (input_side, output_side), "kl_weight": 1.0, "ce_weight": 0.0,
      "local_weight": 0.0, "ctx_len": 128, "remove_bos": True, "normalize_local": True}` (the local loss over the
      batch's variance of the target, an FVU for MSE); `data` then yields batches of texts (lists of
      strings), and the dictionaries see raw activations (normalize_activations must be off). A config's
      `initial_weights` (a saved dictionary folder) starts it from a trained dictionary (fine-tuning).
    transcoder: accepted for upstream's signature; transcoders are recognised from their dictionaries and (x, y)
      batches. device: where autocast runs (default: the first trainer's device).
    Returns the trainers (their dictionaries are trained on the scaled activations if normalize_activations; each
    trainer's `normalization_scales` is its (scale_in, scale_out), which `ae.fold_scale` folds in).
    """
    if isinstance(data, (str, bytes)):
        raise TypeError("data must be an iterable of activation batches (e.g. an ActivationBuffer), got a string")
    if isinstance(trainer_configs, dict) or not isinstance(trainer_configs, (list, tuple)):
        raise TypeError(f"trainer_configs must be a list of trainer config dicts, got "
                        f"{type(trainer_configs).__name__}" + (" (wrap the one config in a list)"
                                                               if isinstance(trainer_configs, dict) else ""))
    if not trainer_configs:
        raise ValueError("trainer_configs is empty: pass at least one trainer config")
    if steps is not None:
        integer("steps", steps)
        for i, config in enumerate(trainer_configs):  # its schedules (lr decay, sparsity warmup) would end early
            if isinstance(config, dict) and isinstance(config.get("steps"), int) and config["steps"] < steps:
                raise ValueError(f"trainer config {i} has steps={config['steps']!r}, fewer than the steps={steps} "
                                 f"trainSAE runs: its schedules would end before training does")
    if normalize_activations not in NORMALIZATIONS:
        raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, got {normalize_activations!r}")
    integer("normalization_batches", normalization_batches)
    for name, value in (("checkpoint_steps", checkpoint_steps), ("backup_steps", backup_steps),
                        ("log_steps", log_steps)):
        if value is not None:
            integer(name, value)
    rank, world_size = check_mode(distributed)
    mine = list(range(len(trainer_configs)))  # the trainers this process trains
    if distributed == "trainers":
        mine = mine[rank::world_size]
        if not mine:
            raise ValueError(f"distributed='trainers' with {world_size} ranks needs at least {world_size} trainers, "
                             f"got {len(trainer_configs)}: rank {rank} would train none")
    trainers = [build_trainer(trainer_configs[i]) for i in mine]
    if end_to_end is not None:
        if normalize_activations:
            raise ValueError("end_to_end trains on raw activations (the model's own values are patched): set "
                             "normalize_activations=False")
        trainers = [EndToEnd(trainer, **end_to_end) for trainer in trainers]
    sync = DataParallel() if distributed == "data" else None
    if sync is not None:
        prepare_data_parallel(trainers, sync)
    writes = rank == 0 or distributed == "trainers"  # whether this process writes dictionaries and checkpoints
    save_dir = Path(save_dir) if save_dir is not None else None
    if save_dir is not None and writes:
        check_writable_folder("save_dir", save_dir)
    directories = [save_dir / f"trainer_{i}" for i in mine] if save_dir and writes else []
    save_steps = _save_steps(save_steps)
    # one writer per run folder (per rank's own files with distributed="trainers"): a second run there is refused
    key = f"{save_dir.name}.rank{rank}" if distributed == "trainers" and save_dir is not None else None
    with (writer_lock(save_dir, "training run folder", key=key) if save_dir is not None and writes
          else nullcontext()):
        run_config = {"buffer": data.config} if hasattr(data, "config") else {}
        if end_to_end is not None and not run_config:  # batches of texts: the hook points are the end-to-end ones
            run_config["buffer"] = trainers[0].data_config
        if run_cfg:
            run_config["run"] = dict(run_cfg)
        if distributed is not None:
            run_config["distributed"] = {"mode": distributed, "world_size": world_size}

        routing = Routing(trainers)
        if getattr(data, "entry_names", None) is not None:
            routing.check(data.entry_names)
        data = iter(data)
        # every trainer's state in one file (one per rank with distributed="trainers")
        checkpoint = (save_dir / (f"checkpoint.rank{rank}.pt" if distributed == "trainers" and world_size > 1
                                  else CHECKPOINT) if save_dir else None)
        state = resume_from_checkpoints(trainers, checkpoint, data, resume)
        if resume and state["step"] == 0 and verbose:
            print(f"no checkpoint in {save_dir}; starting from step 0")
        start, consumed = state["step"], state["batches_consumed"]
        # (scale_in, scale_out), or one such pair per hook point name for dict batches
        saved_scales = state.get("scales", (1.0, 1.0))
        scales: Any = ({name: tuple(pair) for name, pair in saved_scales.items()} if isinstance(saved_scales, dict)
                       else tuple(saved_scales))
        if normalize_activations and start == 0:
            # the normalisation batches are not trained on (as upstream); a resumed run skips them too
            sample = [batch for _, batch in zip(range(normalization_batches), data)]
            if not sample:
                raise ValueError("data yielded no batches")
            target = "d_model" if normalize_activations == "d_model" else "unit"
            over_ranks = sync.mean if sync is not None else None  # the global batches' mean squared norm
            if isinstance(sample[0], dict):
                routing.check(sample[0])
                scales = {name: activation_scales([batch[name] for batch in sample], target, over_ranks)
                          for name in dict.fromkeys(routing.names)}
            else:
                scales = activation_scales(sample, target, over_ranks)
            consumed += len(sample)

        def scales_of(i: int) -> tuple[float, float]:
            return scales[routing.names[i]] if isinstance(scales, dict) else scales

        def prepare(batch: Any) -> Any:
            if isinstance(batch, dict):  # only the entries some trainer trains on, each scaled by its own factors
                if not routing.checked:
                    routing.check(batch)
                return {name: (_scaled(batch[name], *scales[name]) if isinstance(scales, dict) else batch[name])
                        for name in dict.fromkeys(routing.names)}
            if isinstance(scales, dict):
                raise ValueError("the data yielded a single batch where the checkpoint (or the normalisation batches) "
                                 "had a dict of hook points")
            return _scaled(batch, *scales)

        def select(i: int, batch: Any) -> Any:
            batch = routing(i, batch)
            return batch[..., i, :] if activations_split_by_head else batch

        def save_all(step: int) -> None:
            for i, (trainer, directory) in enumerate(zip(trainers, directories)):
                _save_intermediate(trainer, directory / "checkpoints" / f"ae_{step}.pt", scales_of(i))

        if 0 in save_steps and start == 0 and writes:  # upstream saves step 0 (the initial weights) when asked
            save_all(0)

        def logged() -> dict[str, float]:  # named by each trainer's index in trainer_configs
            return {f"trainer_{i}/{k}": v for i, t in zip(mine, trainers)
                    for k, v in t.get_logging_parameters().items() if isinstance(v, (int, float))}

        run = None
        if use_wandb and rank == 0:  # distributed="trainers": rank 0's trainers only
            run = start_wandb({f"trainer_{i}": t.config for i, t in zip(mine, trainers)} | run_config, save_dir,
                              project=wandb_project or "dictionary_learning", entity=wandb_entity or None,
                              resume=resume)
        device_type = torch.device(device).type if device else trainers[0].device.type
        autocast = (torch.autocast(device_type=device_type, dtype=autocast_dtype)
                    if autocast_dtype != torch.float32 else None)
        saved = ({name: list(pair) for name, pair in scales.items()} if isinstance(scales, dict) else list(scales))
        done = run_steps(trainers, data, steps, start=start, consumed=consumed,
                         checkpoint_path=checkpoint if writes else None,
                         checkpoint_steps=checkpoint_steps or backup_steps, checkpoint_extra={"scales": saved},
                         save_steps=save_steps if writes else (), on_save=save_all, log_steps=log_steps,
                         log_values=logged, run=run, context=autocast, prepare=prepare, select=select,
                         bar_keys=("loss", "l0", "fvu"), progress=progress and rank == 0, verbose=verbose and rank == 0,
                         all_have=sync.all_true if sync is not None else None)
        if done == 0:  # nothing trained: never save an untrained dictionary as if it were one
            raise ValueError("data yielded no batches to train on (after any normalisation batches): nothing was "
                             "trained")
        for i, trainer in enumerate(trainers):
            trainer.normalization_scales = scales_of(i)  # what the trained weights expect inputs / targets scaled by
        for i, (trainer, directory) in enumerate(zip(trainers, directories)):
            _save(trainer, directory, scales_of(i), run_config)
        if distributed is not None:  # every rank returns once the files are written
            torch.distributed.barrier()
        if checkpoint is not None and writes and not keep_checkpoint:
            checkpoint.unlink(missing_ok=True)  # the run is complete in its saved dictionaries
        return trainers


FOUNDING_KEYWORDS = {"activation_dim", "dictionary_size", "dict_size", "lr", "sparsity_penalty", "entropy",
                     "warmup_steps", "resample_steps"}


def trainSAE(data: Iterable[Any], *args: Any, **kwargs: Any) -> Any:
    """Train dictionaries on an activation stream. Two call forms, told apart by their arguments:

    - `trainSAE(data, trainer_configs, steps, ...)` (upstream since 2024, and this toolkit): every trainer config
      (`{"trainer": TopKTrainer, "activation_dim": ..., ...}`) trains on the same batches; returns the trainers.
      See `train_dictionaries` for every parameter.
    - `trainSAE(activations, activation_dim, dictionary_size, lr=, sparsity_penalty=, entropy=False, steps=None, ...)`
      (the founding README of December 2023): one `AutoEncoder` trained by the original recipe (unit-norm decoder
      through constrained Adam, L1 or entropy penalty, lr warmup, dead-neuron resampling); returns the AutoEncoder.
      See `training.upstream.train_autoencoder`.
    """
    founding = bool(args) and isinstance(args[0], int) and not isinstance(args[0], bool)
    if founding or FOUNDING_KEYWORDS & set(kwargs):
        return train_autoencoder(data, *args, **kwargs)
    return train_dictionaries(data, *args, **kwargs)

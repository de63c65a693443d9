"""`train_dictionaries`: train one or many dictionaries on one activation stream (each batch is
collected once), on the one training loop (`loop.run_steps`), read top to bottom: check the options
(`RunOptions`), place the run (`Placement`: distributed modes), build the trainers, then resume,
normalise, train, save. Upstream's `trainSAE` call forms map onto it in `upstream.py`."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..checks import finite_hyperparameters, integer
from ..checks import options as options_of
from ..files import check_writable_folder, writer_lock
from ..trainers import TRAINER_CLASSES
from ..trainers.base import Trainer
from ..trainers.trainer import SAETrainer
from ..utils import save_dictionary
from .distributed import DataParallel, check_mode, check_same_on_every_rank
from .end_to_end import EndToEnd
from .feed import NORMALIZATIONS, Feed, Routing, Scales
from .logger import Logger, start_wandb
from .loop import CHECKPOINT, Checkpoints, Every, Saves, run_steps


def build_trainer(config: dict[str, Any]) -> SAETrainer:
    """A trainer from an upstream-style config dict: {"trainer": TopKTrainer, "dict_class": ...,
    ...} (the other keys are the trainer's config fields; `initial_weights`, a saved dictionary,
    starts it from those weights)."""
    if not isinstance(config, dict):
        raise TypeError(f"a trainer config is a dict, got {type(config).__name__}")
    config = dict(config)
    trainer_class = config.pop("trainer", None)
    if isinstance(trainer_class, str):
        if trainer_class not in TRAINER_CLASSES:
            raise ValueError(f"unknown trainer {trainer_class!r}; known: {sorted(TRAINER_CLASSES)}")
        trainer_class = TRAINER_CLASSES[trainer_class]
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, SAETrainer)):
        raise ValueError("config['trainer'] must be a trainer class such as TopKTrainer, got "
                         f"{trainer_class!r}")
    if issubclass(trainer_class, Trainer):
        accepted = {field.name for field in dataclasses.fields(trainer_class.Config)}
    else:  # a subclass of upstream's SAETrainer: its constructor's parameters
        accepted = (set(inspect.signature(trainer_class.__init__).parameters)
                    - {"self", "args", "kwargs"})
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(f"unknown {trainer_class.__name__} config keys {unknown}; accepted: "
                         f"{sorted(accepted)}")
    finite_hyperparameters(trainer_class.__name__, config)
    return trainer_class(**config)


def prepare_data_parallel(trainers: list[SAETrainer], sync: DataParallel) -> None:
    """Give every trainer the collectives and rank 0's initial weights; refuse what would make ranks
    diverge."""
    configs = [{key: value for key, value in trainer.config.items() if key != "device"}
               for trainer in trainers]
    check_same_on_every_rank(sync, configs, "trainer configs")  # (each rank has its own GPU)
    for trainer in trainers:
        if getattr(trainer, "resample_steps", None) is not None:
            raise ValueError(f"{type(trainer).__name__} with "
                             f"resample_steps={trainer.resample_steps} cannot train data-parallel: "
                             "each rank would resample dead neurons from its own batch, and the "
                             "ranks' weights would diverge; use resample_steps=None or "
                             "distributed='trainers'")
        if not trainer.exact_data_parallel:
            warnings.warn(f"{type(trainer).__name__} under distributed='data' computes some "
                          "statistic per rank (the annealed penalty's rescaling, from each rank's "
                          "own losses), so it does not equal one process on the global batches "
                          "exactly; the weights stay identical across ranks")
        trainer.distributed = sync
        sync.broadcast_module(trainer.ae)



@dataclasses.dataclass
class RunOptions:
    """How `train_dictionaries` runs (everything but the data, the trainer configs and the steps).

    save_dir: each trainer saves to `save_dir/trainer_{i}/` (`ae.pt`, `model.safetensors`,
      `config.json`); `save_steps` (a list of steps, or an int: every that many steps) adds
      upstream's intermediate saves `checkpoints/ae_{n}.pt` (the state dict after n steps).
    checkpoint_steps (upstream: backup_steps): write a resumable `save_dir/checkpoint.pt` (every
      trainer's state in one file, written atomically) every this many steps (default: at save_steps
      and every max(1, steps // 10) steps when save_dir is given). `resume=True` continues from it,
      skipping the batches the interrupted run consumed, so the result equals an uninterrupted run.
      Once the dictionaries are saved at the end, the checkpoint is deleted unless `keep_checkpoint`
      (it holds every trainer's optimizer state: several times the dictionaries' size).
    log_steps, use_wandb, wandb_entity, wandb_project: every log_steps steps the trainers' logged
      values go to one wandb run (mode from $WANDB_MODE, default "offline": no network needed) and,
      with `verbose`, are printed. progress: the bar with live loss, L0 and FVU.
    normalize_activations: True or "unit" (upstream): scale inputs (and targets) by one factor each
      so their mean squared norm is 1 while training; "d_model": to their width instead. The factor
      is estimated on the first `normalization_batches` batches (not trained on) and folded into the
      saved weights, which work on raw activations; config.json records it as upstream's
      `norm_factor`.
    activations_split_by_head: batches are `[batch, n_heads, d_head]` and trainer i trains on head
    i. device, autocast_dtype: autocast to `autocast_dtype` (float32: none) on `device` (default:
    the first trainer's).
    distributed: in a torch.distributed run (`torchrun`, then `training.init_distributed()`),
      "data": every rank trains every dictionary on its own share of each global batch (`data`
      yields this rank's share, e.g. a buffer over `training.shard(texts)` or a cache reader with
      rank / world_size), gradients and dead-feature statistics are combined so the run equals one
      process on the global batches; rank 0 writes the checkpoint and the dictionaries, and resume
      works as in one process. "trainers": rank r builds and trains trainers r, r + world_size, ...
      on all of `data` (the same stream on every rank), saving its own `trainer_{i}` folders and
      `checkpoint.rank{r}.pt`; it returns only its own trainers. save_dir must be a folder every
      rank sees.
    end_to_end: train every dictionary on the model's downstream loss (`training.EndToEnd`): a dict
      of its arguments, `{"model": lm, "hooks": (point,) or (input_side, output_side), "kl_weight":
      1.0, "ce_weight": 0.0, "local_weight": 0.0, "ctx_len": 128, "remove_bos": True,
      "normalize_local": True}` (the local loss over the batch's variance of the target, an FVU for
      MSE); `data` then yields batches of texts (lists of strings), and the dictionaries see raw
      activations (normalize_activations must be off). A config's `initial_weights` (a saved
      dictionary folder) starts it from a trained dictionary (fine-tuning).
    run_cfg: extra values saved in each config.json under "run".
    """

    save_dir: str | Path | None = None
    save_steps: list[int] | int | None = None
    checkpoint_steps: int | None = None
    resume: bool = False
    keep_checkpoint: bool = False
    log_steps: int | None = None
    use_wandb: bool = False
    wandb_entity: str | None = None
    wandb_project: str | None = None
    progress: bool = True
    verbose: bool = False
    normalize_activations: bool | str = False
    normalization_batches: int = 8
    activations_split_by_head: bool = False
    device: str | None = None
    autocast_dtype: torch.dtype = torch.float32
    distributed: str | None = None
    end_to_end: dict[str, Any] | None = None
    run_cfg: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, got "
                             f"{self.normalize_activations!r}")
        integer("normalization_batches", self.normalization_batches)
        for name in ("checkpoint_steps", "log_steps"):
            if getattr(self, name) is not None:
                integer(name, getattr(self, name))
        self.save_at()  # checks save_steps
        if self.end_to_end is not None and self.normalize_activations:
            raise ValueError("end_to_end trains on raw activations (the model's own values are "
                             "patched): set normalize_activations=False")

    def save_at(self) -> Sequence[int] | Every:
        """The steps of the intermediate saves: a sorted list, or `Every(n)` for an int."""
        if self.save_steps is None:
            return ()
        if isinstance(self.save_steps, int) and not isinstance(self.save_steps, bool):
            if self.save_steps <= 0:
                raise ValueError("save_steps must be a positive int or a list of steps, got "
                                 f"{self.save_steps}")
            return Every(self.save_steps)
        return sorted({integer("each of save_steps", step, low=0) for step in self.save_steps})


@dataclasses.dataclass
class Placement:
    """Where this process stands in a run: its rank among `world_size`, the indices of the trainer
    configs it trains (`mine`), whether it writes dictionaries and checkpoints, and the
    data-parallel collectives (`sync`)."""

    mode: str | None
    rank: int
    world_size: int
    mine: list[int]
    writes: bool
    sync: DataParallel | None

    @classmethod
    def of(cls, mode: str | None, n_trainers: int) -> Placement:
        rank, world_size = check_mode(mode)
        mine = list(range(n_trainers))
        if mode == "trainers":
            mine = mine[rank::world_size]
            if not mine:
                raise ValueError(f"distributed='trainers' with {world_size} ranks needs at least "
                                 f"{world_size} trainers, got {n_trainers}: rank {rank} would "
                                 "train none")
        sync = DataParallel() if mode == "data" else None
        return cls(mode, rank, world_size, mine, rank == 0 or mode == "trainers", sync)

    def folders(self, save_dir: Path | None) -> list[Path]:
        """The folders this process saves its trainers' dictionaries to."""
        return ([save_dir / f"trainer_{i}" for i in self.mine]
                if save_dir is not None and self.writes else [])

    def checkpoint(self, save_dir: Path | None) -> Path | None:
        """The checkpoint file this process resumes from (one per rank with
        distributed="trainers")."""
        if save_dir is None:
            return None
        per_rank = self.mode == "trainers" and self.world_size > 1
        return save_dir / (f"checkpoint.rank{self.rank}.pt" if per_rank else CHECKPOINT)

    def lock(self, save_dir: Path | None) -> Any:
        """One writer per run folder (per rank's own files with distributed="trainers"): a second is
        refused."""
        if save_dir is None or not self.writes:
            return nullcontext()
        key = f"{save_dir.name}.rank{self.rank}" if self.mode == "trainers" else None
        return writer_lock(save_dir, "training run folder", key=key)


def check_arguments(data: Any, trainer_configs: Any, steps: int | None) -> None:
    if isinstance(data, (str, bytes)):
        raise TypeError("data must be an iterable of activation batches (e.g. an "
                        "ActivationBuffer), got a string")
    if isinstance(trainer_configs, dict) or not isinstance(trainer_configs, (list, tuple)):
        raise TypeError(f"trainer_configs must be a list of trainer config dicts, got "
                        f"{type(trainer_configs).__name__}" + (" (wrap the one config in a list)"
                                                               if isinstance(trainer_configs, dict)
                                                               else ""))
    if not trainer_configs:
        raise ValueError("trainer_configs is empty: pass at least one trainer config")
    if steps is not None:
        integer("steps", steps)
        # its schedules (lr decay, sparsity warmup) would end early
        for i, config in enumerate(trainer_configs):
            if (isinstance(config, dict) and isinstance(config.get("steps"), int)
                    and config["steps"] < steps):
                raise ValueError(f"trainer config {i} has steps={config['steps']!r}, fewer than "
                                 f"the steps={steps} trainSAE runs: its schedules would end before "
                                 "training does")


def build_trainers(trainer_configs: Sequence[dict[str, Any]], place: Placement,
                   end_to_end: dict[str, Any] | None) -> list[SAETrainer]:
    """This process's trainers, wrapped for end-to-end training and given the data-parallel
    collectives."""
    trainers = [build_trainer(trainer_configs[i]) for i in place.mine]
    if end_to_end is not None:
        trainers = [EndToEnd(trainer, **end_to_end) for trainer in trainers]
    if place.sync is not None:
        prepare_data_parallel(trainers, place.sync)
    return trainers


def run_description(data: Any, trainers: Sequence[SAETrainer], options: RunOptions,
                    place: Placement) -> dict[str, Any]:
    """What each saved config.json records of the run beside the trainer: the buffer (its
    hook points), run_cfg and the distributed mode."""
    described = {"buffer": data.config} if hasattr(data, "config") else {}
    # batches of texts: the hook points are the e2e ones
    if options.end_to_end is not None and not described:
        described["buffer"] = trainers[0].data_config
    if options.run_cfg:
        described["run"] = dict(options.run_cfg)
    if place.mode is not None:
        described["distributed"] = {"mode": place.mode, "world_size": place.world_size}
    return described


def _save(ae: Any, trainer: SAETrainer, folder: Path, scales: tuple[float, float],
          described: dict[str, Any]) -> None:
    """The final dictionary (`ae`, its normalisation folded in) in upstream's format."""
    norm_factor = {"norm_factor": 1 / scales[0]} if scales != (1.0, 1.0) else {}
    config = {"trainer": {**trainer.config, **norm_factor, "normalization_scales": list(scales)},
              **described}
    save_dictionary(ae, folder, config)


def train_dictionaries(data: Iterable[Any], trainer_configs: list[dict[str, Any]],
                       steps: int | None, run_options: RunOptions | None = None,
                       **options: Any) -> list[SAETrainer]:
    """Train every trainer in `trainer_configs` on the same batches from `data` for `steps` steps
    (None: until the data runs out); `options` are `RunOptions` fields (or pass `run_options`).
    Returns the trainers (their dictionaries are trained on the scaled activations if
    normalize_activations; each trainer's `normalization_scales` is its (scale_in, scale_out), which
    `ae.fold_scale` folds in).

    data: an iterator of `[batch, d]` tensors, or of `(x, y)` pairs for transcoders (e.g.
      an ActivationBuffer); dict batches `{name: tensor or (x, y)}` (a buffer over many hook points,
      or an activation cache) train each trainer on the entry its config's `submodule_name` names (a
      clear error if it names none or an unknown one); each entry then has its own normalisation
      factor.
    """
    options = options_of(RunOptions, run_options, options, "train_dictionaries")
    check_arguments(data, trainer_configs, steps)
    place = Placement.of(options.distributed, len(trainer_configs))
    trainers = build_trainers(trainer_configs, place, options.end_to_end)
    save_dir = Path(options.save_dir) if options.save_dir is not None else None
    if save_dir is not None and place.writes:
        check_writable_folder("save_dir", save_dir)
    with place.lock(save_dir):
        described = run_description(data, trainers, options, place)
        routing = Routing(trainers)
        if getattr(data, "entry_names", None) is not None:
            routing.check(data.entry_names)
        batches = iter(data)
        checkpoints = Checkpoints(place.checkpoint(save_dir), options.checkpoint_steps, steps,
                                  at=options.save_at(), writes=place.writes)
        state = checkpoints.resume(trainers, batches, options.resume)
        if options.resume and state["step"] == 0 and options.verbose:
            print(f"no checkpoint in {save_dir}; starting from step 0")
        start, consumed = state["step"], state["batches_consumed"]
        scales = Scales.saved(routing, state.get("scales", (1.0, 1.0)))
        # a resumed run skips the normalisation batches too
        if options.normalize_activations and start == 0:
            sample = list(itertools.islice(batches, options.normalization_batches))
            target = "d_model" if options.normalize_activations == "d_model" else "unit"
            scales.estimate(sample, target, place.sync.mean if place.sync is not None else None)
            consumed += len(sample)
        checkpoints.extra = {"scales": scales.to_save()}
        folders = place.folders(save_dir)
        wandb_run = None
        if options.use_wandb and place.rank == 0:  # distributed="trainers": rank 0's trainers only
            wandb_run = start_wandb({f"trainer_{i}": t.config
                                     for i, t in zip(place.mine, trainers)} | described,
                                    save_dir,
                                    project=options.wandb_project or "dictionary_learning",
                                    entity=options.wandb_entity or None, resume=options.resume)
        logger = Logger(progress=options.progress and place.rank == 0, keys=("loss", "l0", "fvu"),
                        every=options.log_steps, run=wandb_run,
                        verbose=options.verbose and place.rank == 0, names=place.mine)
        device_type = (torch.device(options.device).type if options.device
                       else trainers[0].device.type)
        autocast = (torch.autocast(device_type=device_type, dtype=options.autocast_dtype)
                    if options.autocast_dtype != torch.float32 else None)
        done = run_steps(trainers, batches, steps, start, consumed, checkpoints=checkpoints,
                         saves=Saves(folders, options.save_at(), scales), logger=logger,
                         feed=Feed(routing, scales, options.activations_split_by_head),
                         context=autocast,
                         all_have=place.sync.all_true if place.sync is not None else None)
        if done == 0:  # nothing trained: never save an untrained dictionary as if it were one
            raise ValueError("data yielded no batches to train on (after any normalisation "
                             "batches): nothing was trained")
        for i, trainer in enumerate(trainers):
            # what the trained weights expect inputs / targets scaled by
            trainer.normalization_scales = scales.of(i)
        # again: a buffer's description counts what its filter dropped while training
        described = run_description(data, trainers, options, place)
        for i, (trainer, folder) in enumerate(zip(trainers, folders)):
            _save(scales.folded(trainer.ae, i), trainer, folder, scales.of(i), described)
        if place.mode is not None:  # every rank returns once the files are written
            torch.distributed.barrier()
        if checkpoints.written is not None and not options.keep_checkpoint:
            # the run is complete in its saved dictionaries
            checkpoints.path.unlink(missing_ok=True)
        return trainers

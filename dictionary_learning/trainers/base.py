"""The base of every training method: a config dataclass, a side-effect-free step and the update
around it.

A method is a `TrainerConfig` subclass (its hyperparameters, validated in `__post_init__`, a JSON
round trip) and a `Trainer` subclass that says what differs:

    build_dictionary / build_optimizer / lr_factor   what to train, with what (defaults: Adam,
                                                     `parts.lr_schedule`)
    step_loss(x, y, step) -> StepOutput              the loss of a batch, changing no state
    before_step(step, x, y)                          state changes before it (b_dec at the
                                                     median on step 0)
    after_step(step, out)                            state changes after the optimizer step
                                                     (dead features, thresholds, annealing,
                                                     resampling), driven by the StepOutput
    before_optimizer_step / after_optimizer_step     the decoder geometry (projected gradient,
                                                     renormalisation)

`update(step, activations, extra_loss=None)` runs them in that order; `extra_loss(out)` replaces the
loss that is backpropagated (end-to-end training adds the model's downstream loss to the trainer's
own this way). Trainers take tensors, never models or buffers: x `[batch, d_in]`, and
y `[batch, d_out]` for transcoders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch

from ..checks import options
from ..dictionary import Dictionary, load_state_dict
from ..files import json_safe
from .config import PenaltyConfig, TrainerConfig, check_schedule  # noqa: F401 (the base's names)
from .parts import (
    DeadFeatures,
    Resampling,
    UnitNormDecoder,
    adam,
    lr_schedule,
    resample_rows,
    sparsity_ramp,
)


class StepOutput(NamedTuple):
    """One batch's step: the loss to backpropagate, the reconstruction, which latents fired
    (`[d_sae]` bool, over the global batch in data-parallel training), the mean active latents per
    token, the terms to log, and what `after_step` needs (e.g. the kept codes, for the inference
    threshold)."""

    loss: torch.Tensor
    y_hat: torch.Tensor
    fired: torch.Tensor
    l0: float
    metrics: dict[str, float]
    state: dict[str, Any]


def split_batch(batch: Any, dictionary: Dictionary) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, target) of a training batch, validated: target = x for SAEs, y for transcoders' (x, y)
    pairs."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"a transcoder batch is a pair (x, y), got {len(batch)} tensors")
        x, y = batch
    else:
        x, y = batch, None
    dictionary.check_input(x, check_dtype=False)  # batch_tensors casts to the dictionary's dtype
    if x.dim() > 1 and x.shape[0] == 0:
        raise ValueError("a batch must hold at least one activation vector, got shape "
                         f"{tuple(x.shape)}")
    if dictionary.transcoder and y is None:
        raise ValueError("this dictionary is a transcoder: batches must be (x, y) pairs")
    if y is None:
        y = x
    elif not dictionary.transcoder and y is not x and (y.shape != x.shape or not torch.equal(y, x)):
        raise ValueError("this dictionary is an SAE (it reconstructs its input) but the batch is "
                         "an (x, y) pair with y != x: build a transcoder (output_dim=... or "
                         "transcoder=True) to learn x -> y, or pass x")
    if y.shape[-1] != dictionary.output_dim or y.shape[0] != x.shape[0]:
        raise ValueError(f"expected targets of shape [{x.shape[0]}, {dictionary.output_dim}], got "
                         f"{tuple(y.shape)}")
    for name, tensor in (("x", x), ("y", y)) if y is not x else (("x", x),):
        if not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise ValueError(f"activations {name} contain {bad} NaN / inf values")
    return x, y


class Trainer:
    """A training method: `Config` (its hyperparameters), the dictionary it trains (`ae`), the
    optimizer, the lr schedule and dead-feature counts, and `update(step, batch)`. Built from a
    config (`Trainer(config=cfg)`, fields given beside it replace the config's) or from the config's
    fields as keywords (upstream's positional order: `compat.trainer_api.UpstreamTrainerAPI`)."""

    Config: ClassVar[type[TrainerConfig]] = TrainerConfig
    default_dict_class: ClassVar[type[Dictionary] | None] = None
    max_grad_norm: ClassVar[float | None] = 1.0  # gradient clipping before each step (None: none)
    # whether data-parallel training equals one process on the global batch (False: some statistic
    # is per rank)
    exact_data_parallel: ClassVar[bool] = True
    # upstream's: attributes logged with each step's metrics
    logging_parameters: ClassVar[list[str]] = []
    # with resample_steps: resample at steps where step % resample_steps == this
    resample_phase: ClassVar[int] = 0
    # decoder directions held at unit norm (`parts.UnitNormDecoder`: the gradient along each
    # projected out before the optimizer step, the directions renormalised after it)
    unit_norm_decoder: ClassVar[bool] = False

    distributed: Any = None  # training.distributed.DataParallel in data-parallel training
    in_update: bool = False  # inside `update`, which adds a step's `row_gradients` after backward

    def __init__(self, config: TrainerConfig | None = None, **fields: Any) -> None:
        cfg = self.cfg = options(self.Config, config, fields, type(self).__name__)
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        # as upstream
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.ae = self.build_dictionary().to(self.device)
        self.optimizer = self.build_optimizer()
        self.decoder_norm = UnitNormDecoder(self.ae) if self.unit_norm_decoder else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor())
        self.dead = DeadFeatures(self.ae.dict_size, self.device)
        period = getattr(cfg, "resample_steps", None)
        self.resampling = None if period is None else Resampling(
            period, self.resample_phase % period, self.ae.dict_size, self.device, cfg.seed,
            self.device)
        self.sparsity_warmup_fn = sparsity_ramp(getattr(cfg, "sparsity_warmup_steps", None),
                                                cfg.steps)
        self.last_metrics: dict[str, float] = {}
        self.setup()
        if cfg.initial_weights is not None:
            self.start_from(cfg.initial_weights)

    # what a method provides -----------------------------------------------------------------------
    def dictionary_arguments(self) -> dict[str, Any]:
        """The transcoder options, passed only when used, so dictionary classes with upstream's
        (activation_dim, dict_size) constructor work too."""
        cfg = self.cfg
        if cfg.output_dim is None and not cfg.transcoder and not cfg.skip:
            return {}
        return {"output_dim": cfg.output_dim, "transcoder": cfg.transcoder, "skip": cfg.skip}

    def build_dictionary(self) -> Dictionary:
        cls = self.cfg.dict_class or self.default_dict_class
        return cls(self.cfg.activation_dim, self.cfg.dict_size, **self.dictionary_arguments())

    def build_optimizer(self) -> torch.optim.Optimizer:
        return adam(self.ae.parameters(), self.cfg.lr)

    def lr_factor(self) -> Callable[[int], float]:
        return lr_schedule(self.cfg.steps, self.cfg.warmup_steps, self.cfg.decay_start,
                           getattr(self.cfg, "resample_steps", None))

    def setup(self) -> None:
        """The method's own state, after the dictionary and optimizer are built."""

    def step_loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepOutput:
        raise NotImplementedError

    def before_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """State changes before a step's loss (e.g. b_dec at the median on the first)."""

    def after_step(self, step: int, x: torch.Tensor, y: torch.Tensor, out: StepOutput) -> None:
        """State changes after the optimizer step: the dead-feature counts and, with
        `resample_steps`, the resampling of neurons dead for over half a period (then the method's
        own, in overrides)."""
        self.dead.update(out.fired, x.shape[0] * (1 if self.distributed is None
                                                  else self.distributed.world_size))
        if self.resampling is not None:
            self.resampling.count(out.fired)
            if self.resampling.due(step):
                self.resample_neurons(self.resampling.dead(), (x, y))

    def resampled_biases(self) -> list[torch.Tensor]:
        """The per-latent parameters a resampled neuron's entries of are zeroed (besides its encoder
        row and decoder column)."""
        return [self.ae.encoder.bias]

    def resample_neurons(self, deads: torch.Tensor, activations: Any) -> int:
        """Re-initialise the dead neurons of the `deads` mask (`[dict_size]` bool) from a batch (x,
        or an (x, y) pair), as `parts.resample_rows`; returns how many were resampled."""
        x, y = self.batch_tensors(activations)
        generator = self.resampling.generator if self.resampling is not None else None
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed or 0)
        with torch.no_grad():
            return resample_rows(self.ae, self.optimizer, deads, x, y, generator,
                                 self.resampled_biases())

    def start_from(self, path: str) -> None:
        """Start from a saved dictionary's weights (a folder or file `load_state_dict` reads), which
        must be of the trainer's dictionary class and shape. Saved dictionaries work on raw
        activations (any training normalisation folded in): continue them without
        `normalize_activations`."""
        state = type(self.ae).from_saved_state(load_state_dict(path)).state_dict()
        if not all(torch.isfinite(tensor).all() for tensor in state.values()
                   if tensor.is_floating_point()):
            raise ValueError(f"initial_weights {path!r} hold NaN / inf values: a run started from "
                             "them could only train on NaN")
        own = self.ae.state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise ValueError(f"initial_weights {path!r} hold a {type(self.ae).__name__} of other "
                             f"shapes than the trainer's ({self.ae.dictionary_config()})")
        with torch.no_grad():
            self.ae.load_state_dict(state)

    def output_from_codes(self, x: torch.Tensor, f: torch.Tensor, y_hat: torch.Tensor,
                          loss: torch.Tensor, metrics: dict[str, float]) -> StepOutput:
        """The StepOutput of a method with dense codes `f` `[batch, d_sae]`."""
        with torch.no_grad():
            active = f != 0
            fired = self.global_fired(active.any(dim=0))
            l0 = active.sum(dim=-1).float().mean().item()
        return StepOutput(loss, y_hat, fired, l0, metrics, {"code": f})

    def before_optimizer_step(self) -> None:
        """Between backward and the optimizer step (the unit-norm decoder's gradient projection)."""
        if self.decoder_norm is not None:
            self.decoder_norm.before_step()

    def after_optimizer_step(self) -> None:
        """After the optimizer step (the unit-norm decoder's renormalisation)."""
        if self.decoder_norm is not None:
            self.decoder_norm.after_step()

    # the step -------------------------------------------------------------------------------------
    def batch_tensors(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, target) of a batch, validated and on the dictionary's device and dtype."""
        x, y = split_batch(batch, self.ae)
        param = next(self.ae.parameters())
        return x.to(device=param.device, dtype=param.dtype), y.to(device=param.device,
                                                                  dtype=param.dtype)

    def update(self, step: int, activations: Any,
               extra_loss: Callable[[StepOutput], torch.Tensor] | None = None
               ) -> float:
        """One training step on a batch (x, or an (x, y) pair for transcoders); returns the loss."""
        x, y = self.batch_tensors(activations)
        self.before_step(step, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.in_update = True  # the step may take rows' gradients outside autograd, added below
        try:
            out = self.step_loss(x, y, step)
        finally:
            self.in_update = False
        loss = out.loss if extra_loss is None else extra_loss(out)
        loss.backward()
        if out.state.get("row_gradients") is not None:  # AuxK's dead rows (`parts.RowGradients`)
            out.state["row_gradients"].add()
        if self.distributed is not None:  # the gradient of the global batch's mean loss
            self.distributed.average_gradients(self.ae.parameters())
        self.before_optimizer_step()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.ae.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.after_optimizer_step()
        self.after_step(step, x, y, out)
        self.last_metrics = self.metrics(y, out, loss)
        return loss.item()

    @torch.no_grad()
    def metrics(self, y: torch.Tensor, out: StepOutput, loss: torch.Tensor) -> dict[str, float]:
        mse = (y - out.y_hat.detach()).pow(2).sum(dim=-1).mean()
        variance = y.var(dim=0, correction=0).sum()  # mean squared distance to the batch mean
        alive = (~self.dead.mask(self.cfg.dead_feature_threshold)).float().mean()
        return {"loss": loss.item(), "mse": mse.item(),
                "fvu": (mse / variance.clamp_min(1e-12)).item(), "l0": float(out.l0),
                "frac_alive": alive.item(), **{k: float(v) for k, v in out.metrics.items()}}

    # data parallelism: batch statistics over the global batch -------------------------------------
    def global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A per-batch mean as the mean over the global batch in data-parallel training
        (itself otherwise)."""
        return value if self.distributed is None else self.distributed.mean(value)

    def global_min(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.distributed is None else self.distributed.min(value)

    def global_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """A batch's rows as the global batch's rows in data-parallel training
        (themselves otherwise)."""
        return rows if self.distributed is None else self.distributed.gather_rows(rows)

    def global_fired(self, fired: torch.Tensor) -> torch.Tensor:
        """Latents fired on any rank's share of the batch."""
        return fired if self.distributed is None else self.distributed.any(fired)

    # saving and resuming --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, optimizer, schedule, dead-feature counts and the
        method's own."""
        resampling = {} if self.resampling is None else {"resampling": self.resampling.state_dict()}
        return {"ae": self.ae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "num_tokens_since_fired": self.dead.counts, "extra": self.extra_state(),
                **resampling}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ae.load_state_dict(state["ae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.dead.counts.copy_(state["num_tokens_since_fired"])
        if self.resampling is not None:
            self.resampling.load_state_dict(state["resampling"])
        self.load_extra_state(state.get("extra", {}))

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def config_values(self) -> dict[str, Any]:
        """The hyperparameters as saved in config.json: the config, with defaults the method
        resolved."""
        return self.cfg.to_dict()

    @property
    def config(self) -> dict[str, Any]:
        """JSON-ready description saved with the dictionary (upstream's keys: trainer_class,
        dict_class, activation_dim, dict_size, lr, ...)."""
        shape = ("dict_class", "activation_dim", "dict_size", "output_dim", "transcoder", "skip")
        values = {key: value for key, value in self.config_values().items() if key not in shape}
        return json_safe({"trainer_class": type(self).__name__, **self.ae.dictionary_config(),
                          **values})

    def get_logging_parameters(self) -> dict[str, Any]:
        """The trainer's logged attributes (upstream API) plus the last step's metrics."""
        values = {name: getattr(self, name) for name in self.logging_parameters
                  if hasattr(self, name)}
        values = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
                  for k, v in values.items()}
        return {**values, **self.last_metrics}

"""Upstream's `trainers.trainer`: the `SAETrainer` base (for trainers written against upstream's
API) and its public helpers `ConstrainedAdam`, `get_lr_schedule`, `get_sparsity_warmup_fn`,
`set_decoder_norm_to_unit_norm` and `remove_gradient_parallel_to_decoder_directions`, with
upstream's checks. This toolkit's methods are built on `base.Trainer` and `parts`; every one of them
is an `SAETrainer` too (`isinstance` and `issubclass` hold)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..checks import integer
from .base import Trainer, check_schedule
from .decoder import project_out_parallel_gradient, unit_norm_rows
from .parts import lr_schedule, sparsity_ramp


class SAETrainer(abc.ABC):  # noqa: B024 (upstream's base has no abstract method)
    """Upstream's base class: `SAETrainer(seed)` stores the seed; a subclass builds `self.ae` (and
    its optimizer) and implements `update(step, activations)`. trainSAE trains such subclasses too
    (checkpoints need `state_dict` / `load_state_dict`, as torch modules and optimizers have)."""

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.logging_parameters: list[str] = []

    def update(self, step: int, activations: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement update(step, activations)")

    def get_logging_parameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.logging_parameters
                if hasattr(self, name)}

    @property
    def config(self) -> dict[str, Any]:
        return {"wandb_name": "trainer"}


SAETrainer.register(Trainer)


def get_lr_schedule(total_steps: int, warmup_steps: int, decay_start: int | None = None,
                    resample_steps: int | None = None,
                    sparsity_warmup_steps: int | None = None) -> Callable[[int], float]:
    """Upstream's lr multiplier (for LambdaLR), `parts.lr_schedule`, with upstream's checks: warmup
    and resampling periods shorter than the run, a decay starting after both warmups and never with
    resampling."""
    integer("total_steps", total_steps)
    for name, warmup in (("warmup_steps", warmup_steps),
                         ("sparsity_warmup_steps", sparsity_warmup_steps)):
        if isinstance(decay_start, int) and isinstance(warmup, int) and not decay_start > warmup:
            raise ValueError(f"decay_start must be > {name}={warmup}, got {decay_start}")
    check_schedule(total_steps, warmup_steps, decay_start, resample_steps, sparsity_warmup_steps)
    if not warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be < steps={total_steps}, got {warmup_steps}")
    if resample_steps is not None and not resample_steps < total_steps:
        raise ValueError(f"resample_steps must be in (0, steps={total_steps}), got "
                         f"{resample_steps}")
    return lr_schedule(total_steps, warmup_steps, decay_start, resample_steps)


def get_sparsity_warmup_fn(total_steps: int,
                           sparsity_warmup_steps: int | None = None) -> Callable[[int], float]:
    """Multiplier on the sparsity penalty: `step / sparsity_warmup_steps` up to 1 (always 1 when
    None or 0)."""
    if sparsity_warmup_steps is not None and not 0 <= sparsity_warmup_steps < total_steps:
        raise ValueError(f"sparsity_warmup_steps must be in [0, steps={total_steps}), got "
                         f"{sparsity_warmup_steps}")
    return sparsity_ramp(sparsity_warmup_steps)


def _check_decoder_shape(W_dec_DF: torch.Tensor, activation_dim: int, d_sae: int) -> None:
    if tuple(W_dec_DF.shape) != (activation_dim, d_sae):
        raise ValueError("expected a decoder weight of shape [activation_dim, d_sae] = "
                         f"[{activation_dim}, {d_sae}] (nn.Linear's layout), got "
                         f"{tuple(W_dec_DF.shape)}")


@torch.no_grad()
def set_decoder_norm_to_unit_norm(W_dec_DF: torch.Tensor, activation_dim: int,
                                  d_sae: int) -> torch.Tensor:
    """Scale each decoder column (`W_dec_DF` is `[activation_dim, d_sae]`, as nn.Linear stores it)
    to unit norm, in place; returns the weight's data."""
    _check_decoder_shape(W_dec_DF, activation_dim, d_sae)
    unit_norm_rows(W_dec_DF.data.t())
    return W_dec_DF.data


@torch.no_grad()
def remove_gradient_parallel_to_decoder_directions(W_dec_DF: torch.Tensor,
                                                   W_dec_DF_grad: torch.Tensor, activation_dim: int,
                                                   d_sae: int) -> torch.Tensor:
    """Subtract from each column of `W_dec_DF_grad` its component along the matching decoder column,
    in place (both `[activation_dim, d_sae]`); returns the gradient."""
    _check_decoder_shape(W_dec_DF, activation_dim, d_sae)
    _check_decoder_shape(W_dec_DF_grad, activation_dim, d_sae)
    project_out_parallel_gradient(W_dec_DF.t(), W_dec_DF_grad.t())
    return W_dec_DF_grad


class ConstrainedAdam(torch.optim.Adam):
    """Adam that keeps the columns (dim 0, nn.Linear decoder layout) of `constrained_params` at unit
    norm: before each step the gradient component parallel to each column is removed, after it the
    columns are renormalised."""

    def __init__(self, params: Iterable[Any], constrained_params: Iterable[torch.Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr=lr, betas=betas, eps=eps)
        self.constrained_params = list(constrained_params)

    def step(self, closure=None):
        with torch.no_grad():
            for p in self.constrained_params:
                if p.grad is not None:
                    direction = p / p.norm(dim=0, keepdim=True)
                    p.grad -= (p.grad * direction).sum(dim=0, keepdim=True) * direction
        loss = super().step(closure=closure)
        with torch.no_grad():
            for p in self.constrained_params:
                p /= p.norm(dim=0, keepdim=True)
        return loss

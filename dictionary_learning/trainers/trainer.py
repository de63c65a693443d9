"""SAETrainer: the shared base of every training method (optimizer, lr schedule, dead-feature tracking, config).

Trainers take tensors, never models or buffers: `update(step, x)` for SAEs and `update(step, (x, y))` for
transcoders, with x `[batch, activation_dim]` and y `[batch, output_dim]`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..dictionary import Dictionary
from ..files import json_safe


def check_steps(steps: Any) -> None:
    """A clear error unless `steps` is a positive int."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def lr_schedule(steps: int, warmup_steps: int = 0, decay_start: int | None = None):
    """Multiplier on the lr: linear warmup over `warmup_steps`, flat, then linear decay to 0 from `decay_start`."""
    if decay_start is not None and not 0 <= decay_start <= steps:
        raise ValueError(f"decay_start must be in [0, steps={steps}], got {decay_start}")

    def factor(step: int) -> float:
        value = 1.0
        if warmup_steps > 0 and step < warmup_steps:
            value = (step + 1) / warmup_steps
        if decay_start is not None and step >= decay_start:
            value = min(value, max(0.0, (steps - step) / max(1, steps - decay_start)))
        return value

    return factor


@torch.no_grad()
def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points` [n, d]."""
    points = points.float()
    guess = points.mean(dim=0)
    for _ in range(iterations):
        previous = guess
        weights = 1.0 / (points - guess).norm(dim=1).clamp_min(1e-8)
        guess = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (guess - previous).norm() < tol * (1 + previous.norm()):
            break
    return guess


def split_batch(batch: Any, dictionary: Dictionary) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, target) of a training batch, validated: target = x for SAEs, y for transcoders' (x, y) pairs."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"a transcoder batch is a pair (x, y), got {len(batch)} tensors")
        x, y = batch
    else:
        x, y = batch, None
    dictionary.check_input(x)
    if dictionary.transcoder and y is None:
        raise ValueError("this dictionary is a transcoder: batches must be (x, y) pairs")
    if y is None:
        y = x
    if y.shape[-1] != dictionary.output_dim or y.shape[0] != x.shape[0]:
        raise ValueError(f"expected targets of shape [{x.shape[0]}, {dictionary.output_dim}], got {tuple(y.shape)}")
    for name, tensor in (("x", x), ("y", y)):
        if not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise ValueError(f"activations {name} contain {bad} NaN / inf values")
    return x, y


class SAETrainer:
    """Base trainer: subclasses implement `loss` (and optionally the optimizer-step hooks). The constructor builds
    what every method shares; `SAETrainer(seed)` alone (upstream's base) only seeds, for subclasses that build
    `self.ae`, `self.optimizer`, `self.scheduler` and tracking themselves."""

    ae: Dictionary
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    max_grad_norm: float | None = 1.0  # gradient clipping before each step (None: none, as some upstream trainers)

    def __init__(self, seed: int | None = None, *, steps: int | None = None,
                 build_dictionary: Callable[[], Dictionary] | None = None, lr: float = 1e-3, warmup_steps: int = 0,
                 decay_start: int | None = None, dead_feature_threshold: int = 10_000_000,
                 device: str | torch.device | None = None, adam_eps: float = 1e-8,
                 config: dict[str, Any] | None = None):
        """Seed torch's generator with `seed`; given `steps` and `build_dictionary` (called after seeding), also
        build the dictionary on `device`, Adam, the lr schedule (warmup, optional decay), dead-feature tracking and
        the config saved with the dictionary (`config` adds the method's own keys)."""
        self.seed = seed
        if seed is not None:
            torch.manual_seed(seed)
        self.logging_parameters: list[str] = []
        self.last_metrics: dict[str, float] = {}
        if steps is None and build_dictionary is None:
            return
        check_steps(steps)
        warmup_steps = min(warmup_steps, steps)
        self.steps, self.lr = steps, lr
        self.device = torch.device(device or "cpu")
        self.ae = build_dictionary().to(self.device)
        self.dead_threshold_tokens = dead_feature_threshold
        self.optimizer = torch.optim.Adam(self.ae.parameters(), lr=lr, betas=(0.9, 0.999), eps=adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(steps, warmup_steps,
                                                                                       decay_start))
        self._init_tracking(self.ae.dict_size, self.device)
        self._config = {"lr": lr, "steps": steps, "warmup_steps": warmup_steps, "decay_start": decay_start,
                        "dead_feature_threshold": dead_feature_threshold, "seed": seed, "device": str(self.device),
                        **(config or {})}

    # dead-feature tracking -------------------------------------------------------------------------------------
    def _init_tracking(self, dict_size: int, device) -> None:
        self.num_tokens_since_fired = torch.zeros(dict_size, dtype=torch.long, device=device)

    @torch.no_grad()
    def _track(self, fired_latents: torch.Tensor, n_tokens: int) -> None:
        self.num_tokens_since_fired += n_tokens
        self.num_tokens_since_fired[fired_latents] = 0

    def dead_mask(self, threshold_tokens: int) -> torch.Tensor:
        return self.num_tokens_since_fired >= threshold_tokens

    # the step --------------------------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Hook between backward and the optimizer step (e.g. gradient projection)."""

    def after_optimizer_step(self) -> None:
        """Hook after the optimizer step (e.g. decoder renormalisation)."""

    def update(self, step: int, activations: Any) -> float:
        """One training step on a batch; returns the loss."""
        x, y = split_batch(activations, self.ae)
        param = next(self.ae.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        y = y.to(device=param.device, dtype=param.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y, step)
        loss.backward()
        self.before_optimizer_step()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.ae.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.after_optimizer_step()
        return loss.item()

    @torch.no_grad()
    def _record(self, y: torch.Tensor, y_hat: torch.Tensor, l0: float, loss: torch.Tensor, **extra: float) -> None:
        mse = (y - y_hat).pow(2).sum(dim=-1).mean()
        variance = (y - y.mean(dim=0)).pow(2).sum(dim=-1).mean()
        self.last_metrics = {
            "loss": loss.item(),
            "mse": mse.item(),
            "fvu": (mse / variance.clamp_min(1e-12)).item(),
            "l0": float(l0),
            "frac_alive": (self.num_tokens_since_fired < self.dead_threshold_tokens).float().mean().item(),
            **{k: float(v) for k, v in extra.items()},
        }

    def get_logging_parameters(self) -> dict[str, Any]:
        """The trainer's logged attributes (upstream API) plus the last step's metrics."""
        values = {name: getattr(self, name) for name in self.logging_parameters if hasattr(self, name)}
        values = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in values.items()}
        return {**values, **self.last_metrics}

    # saving and resuming ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, optimizer, schedule and tracking state."""
        return {
            "ae": self.ae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "num_tokens_since_fired": self.num_tokens_since_fired,
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ae.load_state_dict(state["ae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.num_tokens_since_fired.copy_(state["num_tokens_since_fired"])
        self._load_extra_state(state.get("extra", {}))

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @property
    def config(self) -> dict[str, Any]:
        """JSON-ready description (upstream keys: trainer_class, dict_class, activation_dim, dict_size, lr, ...)."""
        return json_safe({"trainer_class": type(self).__name__, **self.ae.dictionary_config(), **self._config})

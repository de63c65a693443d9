"""SAETrainer: the shared base of every training method (optimizer, lr schedule, dead-feature tracking, config),
and upstream's public training helpers: `ConstrainedAdam`, `get_lr_schedule`, `get_sparsity_warmup_fn`,
`set_decoder_norm_to_unit_norm`, `remove_gradient_parallel_to_decoder_directions`.

Trainers take tensors, never models or buffers: `update(step, x)` for SAEs and `update(step, (x, y))` for
transcoders, with x `[batch, activation_dim]` and y `[batch, output_dim]`.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..checks import finite_hyperparameters, integer
from ..dictionary import Dictionary
from ..files import json_safe
from ..sparse import fast_matmul_dtype

# what upstream's `trainer.loss(x, step=..., logging=True)` returns
LossLog = namedtuple("LossLog", ["x", "x_hat", "f", "losses"])


def check_steps(steps: Any) -> None:
    """A clear error unless `steps` is a positive int."""
    integer("steps", steps)


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


# ----------------------------------------------------------------------------------------------------------------
# upstream's schedules


def _check_schedule(total_steps: int, warmup_steps: int, decay_start: int | None, resample_steps: int | None,
                    sparsity_warmup_steps: int | None, below_total: bool) -> None:
    """Upstream's consistency rules for a schedule, as ValueErrors (`below_total`: also warmup and resampling
    periods shorter than the run)."""
    check_steps(total_steps)
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if below_total and warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps must be < steps={total_steps}, got {warmup_steps}")
    if decay_start is not None:
        if resample_steps is not None:
            raise ValueError(f"decay_start ({decay_start}) and resample_steps ({resample_steps}) cannot both be set")
        if not 0 <= decay_start < total_steps:
            raise ValueError(f"decay_start must be in [0, steps={total_steps}), got {decay_start}")
        if decay_start <= warmup_steps:
            raise ValueError(f"decay_start must be > warmup_steps={warmup_steps}, got {decay_start}")
        if sparsity_warmup_steps is not None and decay_start <= sparsity_warmup_steps:
            raise ValueError(f"decay_start must be > sparsity_warmup_steps={sparsity_warmup_steps}, got {decay_start}")
    if resample_steps is not None and not 0 < resample_steps < (total_steps if below_total else float("inf")):
        raise ValueError(f"resample_steps must be in (0, steps={total_steps}), got {resample_steps}")


def _lr_factor(total_steps: int, warmup_steps: int, decay_start: int | None,
               resample_steps: int | None) -> Callable[[int], float]:
    if resample_steps is not None:  # the warmup restarts after every resampling

        def factor(step: int) -> float:
            return 1.0 if warmup_steps == 0 else min((step % resample_steps) / warmup_steps, 1.0)

        return factor

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if decay_start is not None and step >= decay_start:
            return (total_steps - step) / (total_steps - decay_start)
        return 1.0

    return factor


def get_lr_schedule(total_steps: int, warmup_steps: int, decay_start: int | None = None,
                    resample_steps: int | None = None,
                    sparsity_warmup_steps: int | None = None) -> Callable[[int], float]:
    """Upstream's lr multiplier (for LambdaLR): `step / warmup_steps` during the warmup, then 1, then a linear decay
    to 0 from `decay_start`; with `resample_steps`, the warmup restarts every `resample_steps` steps instead.
    `sparsity_warmup_steps` only takes part in the checks (decay must start after it)."""
    _check_schedule(total_steps, warmup_steps, decay_start, resample_steps, sparsity_warmup_steps, True)
    return _lr_factor(total_steps, warmup_steps, decay_start, resample_steps)


def trainer_lr_schedule(total_steps: int, warmup_steps: int, decay_start: int | None = None,
                        resample_steps: int | None = None,
                        sparsity_warmup_steps: int | None = None) -> Callable[[int], float]:
    """`get_lr_schedule` as the upstream-style trainers here use it: a warmup (or resampling period) longer than the
    run is allowed (the lr then never reaches its full value, or no neuron is resampled, as in the founding
    trainSAE), where upstream stops with an assertion."""
    _check_schedule(total_steps, warmup_steps, decay_start, resample_steps, sparsity_warmup_steps, False)
    return _lr_factor(total_steps, warmup_steps, decay_start, resample_steps)


def get_sparsity_warmup_fn(total_steps: int, sparsity_warmup_steps: int | None = None) -> Callable[[int], float]:
    """Multiplier on the sparsity penalty: `step / sparsity_warmup_steps` up to 1 (always 1 when None or 0)."""
    if sparsity_warmup_steps is not None and not 0 <= sparsity_warmup_steps < total_steps:
        raise ValueError(f"sparsity_warmup_steps must be in [0, steps={total_steps}), got {sparsity_warmup_steps}")
    return sparsity_schedule(sparsity_warmup_steps)


def sparsity_schedule(sparsity_warmup_steps: int | None) -> Callable[[int], float]:
    """`get_sparsity_warmup_fn` without its check: a sparsity warmup longer than the run is allowed."""

    def factor(step: int) -> float:
        return 1.0 if not sparsity_warmup_steps else min(step / sparsity_warmup_steps, 1.0)

    return factor


# ----------------------------------------------------------------------------------------------------------------
# unit-norm decoder columns


def _check_decoder_shape(W_dec_DF: torch.Tensor, activation_dim: int, d_sae: int) -> None:
    if tuple(W_dec_DF.shape) != (activation_dim, d_sae):
        raise ValueError(f"expected a decoder weight of shape [activation_dim, d_sae] = [{activation_dim}, {d_sae}] "
                         f"(nn.Linear's layout), got {tuple(W_dec_DF.shape)}")


@torch.no_grad()
def set_decoder_norm_to_unit_norm(W_dec_DF: torch.Tensor, activation_dim: int, d_sae: int) -> torch.Tensor:
    """Scale each decoder column (`W_dec_DF` is `[activation_dim, d_sae]`, as nn.Linear stores it) to unit norm,
    in place; returns the weight's data."""
    _check_decoder_shape(W_dec_DF, activation_dim, d_sae)
    eps = torch.finfo(W_dec_DF.dtype).eps
    W_dec_DF.data /= W_dec_DF.data.norm(dim=0, keepdim=True) + eps
    return W_dec_DF.data


@torch.no_grad()
def remove_gradient_parallel_to_decoder_directions(W_dec_DF: torch.Tensor, W_dec_DF_grad: torch.Tensor,
                                                   activation_dim: int, d_sae: int) -> torch.Tensor:
    """Subtract from each column of `W_dec_DF_grad` its component along the matching decoder column, in place
    (both `[activation_dim, d_sae]`); returns the gradient."""
    _check_decoder_shape(W_dec_DF, activation_dim, d_sae)
    _check_decoder_shape(W_dec_DF_grad, activation_dim, d_sae)
    directions = W_dec_DF / (W_dec_DF.norm(dim=0, keepdim=True) + 1e-6)  # [activation_dim, d_sae]
    W_dec_DF_grad -= (W_dec_DF_grad * directions).sum(dim=0, keepdim=True) * directions
    return W_dec_DF_grad


class ConstrainedAdam(torch.optim.Adam):
    """Adam that keeps the columns (dim 0, nn.Linear decoder layout) of `constrained_params` at unit norm: before
    each step the gradient component parallel to each column is removed, after it the columns are renormalised."""

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


def resolve_encoder_dtype(encoder_dtype: Any, device: torch.device) -> torch.dtype | None:
    """The dtype a TopK-style trainer runs its dense encoder GEMM in: None (the activations' own), a dtype or its
    name, or "auto": bfloat16 where the hardware multiplies it fast (`sparse.fast_matmul_dtype`), else None."""
    if encoder_dtype is None:
        return None
    if encoder_dtype == "auto":
        fast = fast_matmul_dtype(device)
        return fast if fast != torch.float32 else None
    dtype = getattr(torch, encoder_dtype, None) if isinstance(encoder_dtype, str) else encoder_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"encoder_dtype must be None, 'auto' or a floating dtype such as torch.bfloat16, got "
                         f"{encoder_dtype!r}")
    return dtype


def loss_arguments(x: torch.Tensor, y: Any, step: Any) -> tuple[torch.Tensor, int]:
    """(target, step) of a `loss` call made either as `loss(x, y, step)` or as upstream, `loss(x, step)` /
    `loss(x, step=step)` (the target is then x)."""
    if y is None:
        return x, int(step or 0)
    if not isinstance(y, torch.Tensor):  # upstream's positional step
        return x, int(y)
    return y, int(step or 0)


def upstream_loss_call(x: torch.Tensor, step: Any, logging: Any, y: torch.Tensor | None
                       ) -> tuple[torch.Tensor, int, bool]:
    """(target, step, logging) of a call to a loss with upstream's signature `loss(x, step, logging=False, y=None)`,
    also when made in this toolkit's older positional form `loss(x, y, step)`; the target defaults to x."""
    if isinstance(step, torch.Tensor):  # loss(x, y, step)
        y, step, logging = step, logging, False
    y, step = loss_arguments(x, y, step)
    return y, step, bool(logging)


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points` [n, d]."""
    points = points.float()
    guess = points.mean(dim=0)
    for _ in range(max_iter):
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
    dictionary.check_input(x, check_dtype=False)  # batch_tensors casts to the dictionary's dtype
    if x.dim() > 1 and x.shape[0] == 0:
        raise ValueError(f"a batch must hold at least one activation vector, got shape {tuple(x.shape)}")
    if dictionary.transcoder and y is None:
        raise ValueError("this dictionary is a transcoder: batches must be (x, y) pairs")
    if y is None:
        y = x
    elif not dictionary.transcoder and y is not x and (y.shape != x.shape or not torch.equal(y, x)):
        raise ValueError("this dictionary is an SAE (it reconstructs its input) but the batch is an (x, y) pair with "
                         "y != x: build a transcoder (output_dim=... or transcoder=True) to learn x -> y, or pass x")
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
    # data-parallel training: the collectives (training.distributed.DataParallel) that make N ranks, each on its share
    # of the global batch, train as one process on it; None in a single process
    distributed: Any = None
    # whether data-parallel training equals one process on the global batch (False: some statistic is per rank)
    exact_data_parallel: bool = True

    def __init__(self, seed: int | None = None, *, steps: int | None = None,
                 build_dictionary: Callable[[], Dictionary] | None = None, lr: float = 1e-3, warmup_steps: int = 0,
                 decay_start: int | None = None, dead_feature_threshold: int = 10_000_000,
                 device: str | torch.device | None = None, adam_eps: float = 1e-8,
                 config: dict[str, Any] | None = None,
                 build_optimizer: Callable[[Dictionary], torch.optim.Optimizer] | None = None,
                 lr_lambda: Callable[[int], float] | None = None):
        """Seed torch's generator with `seed`; given `steps` and `build_dictionary` (called after seeding), also
        build the dictionary on `device`, Adam, the lr schedule (warmup, optional decay), dead-feature tracking and
        the config saved with the dictionary (`config` adds the method's own keys). `build_optimizer(ae)` replaces
        Adam (e.g. by `ConstrainedAdam`) and `lr_lambda` the schedule (e.g. upstream's `get_lr_schedule`)."""
        self.seed = seed
        if seed is not None:
            torch.manual_seed(seed)
        self.logging_parameters: list[str] = []
        self.last_metrics: dict[str, float] = {}
        if steps is None and build_dictionary is None:
            return
        check_steps(steps)
        finite_hyperparameters(type(self).__name__, {"lr": lr, **(config or {})})
        if lr_lambda is None:
            warmup_steps = min(warmup_steps, steps)
            lr_lambda = lr_schedule(steps, warmup_steps, decay_start)
        self.steps, self.lr = steps, lr
        # as upstream: CUDA when available unless a device is named
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.ae = build_dictionary().to(self.device)
        self.dead_threshold_tokens = dead_feature_threshold
        if build_optimizer is None:
            self.optimizer = torch.optim.Adam(self.ae.parameters(), lr=lr, betas=(0.9, 0.999), eps=adam_eps)
        else:
            self.optimizer = build_optimizer(self.ae)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self._init_tracking(self.ae.dict_size, self.device)
        self._config = {"lr": lr, "steps": steps, "warmup_steps": warmup_steps, "decay_start": decay_start,
                        "dead_feature_threshold": dead_feature_threshold, "seed": seed, "device": str(self.device),
                        **(config or {})}

    # dead-feature tracking -------------------------------------------------------------------------------------
    def _init_tracking(self, dict_size: int, device) -> None:
        self.num_tokens_since_fired = torch.zeros(dict_size, dtype=torch.long, device=device)

    @torch.no_grad()
    def _track(self, fired_latents: torch.Tensor, n_tokens: int) -> None:
        if self.distributed is not None:  # tokens of the global batch; latents fired on any rank
            fired = torch.zeros_like(self.num_tokens_since_fired, dtype=torch.bool)
            fired[fired_latents] = True
            fired_latents = self.distributed.any(fired).nonzero().flatten()
            n_tokens = n_tokens * self.distributed.world_size
        self.num_tokens_since_fired += n_tokens
        self.num_tokens_since_fired[fired_latents] = 0

    def _set_encoder_dtype(self, encoder_dtype: Any) -> None:
        """`self.encoder_dtype` (`resolve_encoder_dtype`) and its name in the config, for TopK-style trainers."""
        self.encoder_dtype = resolve_encoder_dtype(encoder_dtype, self.device)
        self._config["encoder_dtype"] = str(self.encoder_dtype).removeprefix("torch.") if self.encoder_dtype else None

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A per-batch mean as the mean over the global batch in data-parallel training (itself otherwise)."""
        return value if self.distributed is None else self.distributed.mean(value)

    def _global_min(self, value: torch.Tensor) -> torch.Tensor:
        """A per-batch minimum as the minimum over the global batch in data-parallel training."""
        return value if self.distributed is None else self.distributed.min(value)

    @torch.no_grad()
    def _global_batch_topk(self, pre: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Data-parallel batch top-k: (rows, cols, values) of this rank's pre-activations `[batch, dict_size]` among
        the global batch's `n * world_size` largest positive ones (n: this rank's share), sorted by row and latent,
        as one process selects them on the global batch."""
        n_global = n * self.distributed.world_size
        candidates = self.distributed.gather_rows(pre.flatten().topk(min(n_global, pre.numel()), sorted=False).values)
        smallest_kept = candidates.topk(min(n_global, candidates.numel()), sorted=False).values.min()
        rows, cols = ((pre >= smallest_kept) & (pre > 0)).nonzero(as_tuple=True)
        return rows, cols, pre[rows, cols]

    def _global_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """A batch's rows as the global batch's rows in data-parallel training (themselves otherwise)."""
        return rows if self.distributed is None else self.distributed.gather_rows(rows)

    def dead_mask(self, threshold_tokens: int) -> torch.Tensor:
        return self.num_tokens_since_fired >= threshold_tokens

    # the step --------------------------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, step: int, logging: bool = False, y: torch.Tensor | None = None, **kwargs: Any):
        """The training loss on inputs x and targets y (None: x), upstream's signature; `update` calls it as
        `loss(x, y=y, step=step)` (so `loss(self, x, y, step)` works too)."""
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Hook between backward and the optimizer step (e.g. gradient projection)."""

    def after_optimizer_step(self) -> None:
        """Hook after the optimizer step (e.g. decoder renormalisation)."""

    def batch_tensors(self, activations: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, target) of a batch, validated and on the dictionary's device and dtype."""
        x, y = split_batch(activations, self.ae)
        param = next(self.ae.parameters())
        return x.to(device=param.device, dtype=param.dtype), y.to(device=param.device, dtype=param.dtype)

    def update(self, step: int, activations: Any) -> float:
        """One training step on a batch; returns the loss."""
        x, y = self.batch_tensors(activations)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y=y, step=step)
        loss.backward()
        if self.distributed is not None:  # the gradient of the global batch's mean loss
            self.distributed.average_gradients(self.ae.parameters())
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

    @torch.no_grad()
    def loss_log(self, x: torch.Tensor, y: torch.Tensor) -> LossLog:
        """Upstream's `loss(x, step, logging=True)` result, LossLog(x, x_hat, f, losses), computed without changing any
        training state: the reconstruction error now and the last step's metrics."""
        y_hat, f = self.ae(x, output_features=True)
        mse = (y - y_hat).pow(2).sum(dim=-1).mean().item()
        return LossLog(x, y_hat, f, {**self.last_metrics, "l2_loss": (y - y_hat).norm(dim=-1).mean().item(),
                                     "mse_loss": mse})

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

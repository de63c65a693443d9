"""JumpReluTrainer (Rajamanoharan et al. 2024) and its straight-through functions, at upstream's
import path.

Loss: squared error summed over the output and averaged over the batch, plus `sparsity_penalty * (L0
/ target_l0 - 1)^2`, the penalty ramped in over `sparsity_warmup_steps`. The jump and the L0 count
are step functions of the threshold; their threshold gradients are straight-through estimates with a
rectangle kernel of width `bandwidth` (`JumpReLUFunction`, `StepFunction`), the L0 count passing no
gradient to the pre-activations. As upstream, the L0 count is taken of the codes f (not of
the pre-activations), Adam runs with betas (0, 0.999), decoder rows are kept at unit norm
(`parts.UnitNormDecoder`) and gradients are clipped to norm 1.

The step is sparse where the codes are: only pre-activations above `threshold - bandwidth / 2` can
carry a code or a gradient, so the encoder's backward and the decoder run over those (row, latent)
pairs alone (`sparse.py` kernels). When too many pairs qualify (early in training, when thresholds
start at 0.001), the step runs densely instead; both give the same loss and gradients.
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any

import torch
from torch import autograd

from ..compat.trainer_api import UpdateX, UpstreamTrainerAPI
from ..dictionary import JumpReluAutoEncoder, SparseCode
from . import parts
from .base import PenaltyConfig, StepOutput, Trainer

# what upstream's `JumpReluTrainer.loss(x, step=..., logging=True)` returns (its own field names)
LossLog = namedtuple("LossLog", ["x", "recon", "f", "losses"])
# above this fraction of candidate (row, latent) pairs, the dense step is faster
SPARSE_MAX_DENSITY = 0.1


def rectangle(z: torch.Tensor) -> torch.Tensor:
    """1 on the open interval (-1/2, 1/2), 0 elsewhere, in z's dtype."""
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class RectangleFunction(autograd.Function):
    """The rectangle kernel as an autograd function: the gradient passes where |x| < 1/2."""

    @staticmethod
    def forward(ctx, x):
        inside = rectangle(x)
        ctx.save_for_backward(inside)
        return inside

    @staticmethod
    def backward(ctx, grad_output):
        (inside,) = ctx.saved_tensors
        return grad_output * inside


class JumpReLUFunction(autograd.Function):
    """x * 1[x > threshold]. Gradients: x gets the incoming gradient where the unit fires; the
    threshold gets the straight-through estimate -(threshold / bandwidth) * rectangle((x -
    threshold) / bandwidth) per element, summed to its own shape (so one threshold per latent
    collects over the batch)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = float(bandwidth)
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, threshold = ctx.saved_tensors
        grad_x = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_x = (x > threshold).to(grad_output.dtype) * grad_output
        if ctx.needs_input_grad[1]:
            kernel = rectangle((x - threshold) / ctx.bandwidth)
            grad_threshold = (-(threshold / ctx.bandwidth) * kernel
                              * grad_output).sum_to_size(threshold.shape)
        return grad_x, grad_threshold, None


class StepFunction(autograd.Function):
    """1[x > threshold]. Gradients: none to x; the threshold gets -(1 / bandwidth) * rectangle((x -
    threshold) / bandwidth) per element, summed to its own shape."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = float(bandwidth)
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, threshold = ctx.saved_tensors
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            kernel = rectangle((x - threshold) / ctx.bandwidth)
            grad_threshold = (-(1.0 / ctx.bandwidth) * kernel
                              * grad_output).sum_to_size(threshold.shape)
        return grad_x, grad_threshold, None


@dataclasses.dataclass(kw_only=True)
class JumpReluConfig(PenaltyConfig):
    """Beyond upstream: `output_dim`, `transcoder`, `skip` (a transcoder: batches are (x, y) pairs),
    `dead_feature_threshold` (tokens without firing before a latent counts as dead, for logging),
    and `sparse` (True / False forces the sparse / dense step; None picks by the batch's share of
    candidate pairs)."""

    lr: float | None = 7e-5
    bandwidth: float = 0.001
    sparsity_penalty: float = 1.0
    target_l0: float = 20.0
    device: str | None = "cpu"  # upstream's default
    sparse: bool | None = None
    wandb_name: str | None = "JumpRelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bandwidth", "target_l0"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.bandwidth = float(self.bandwidth)
        if self.sparse not in (None, True, False):
            raise ValueError(f"sparse must be None, True or False, got {self.sparse!r}")


class JumpReluTrainer(UpdateX, UpstreamTrainerAPI, Trainer):
    """Upstream's JumpReluTrainer: trains a `JumpReluAutoEncoder` (or a transcoder of that class)
    toward an average of `target_l0` active latents per token."""

    Config = JumpReluConfig
    positions = ("steps", "activation_dim", "dict_size", "layer", "lm_name", "dict_class", "seed",
                 "lr", "bandwidth", "sparsity_penalty", "warmup_steps", "sparsity_warmup_steps",
                 "decay_start", "target_l0", "device", "wandb_name", "submodule_name")
    default_dict_class = JumpReluAutoEncoder
    unit_norm_decoder = True
    logging_parameters = ["dead_features"]
    loss_log_type = LossLog

    def build_dictionary(self):
        cls = self.cfg.dict_class or self.default_dict_class
        return cls(activation_dim=self.cfg.activation_dim, dict_size=self.cfg.dict_size,
                   device=self.cfg.device, **self.dictionary_arguments())

    def build_optimizer(self) -> torch.optim.Optimizer:
        return parts.adam(self.ae.parameters(), self.cfg.lr, betas=(0.0, 0.999))

    def setup(self) -> None:
        self.dead_features = -1

    @property
    def sparsity_coefficient(self) -> float:  # upstream's name
        return self.cfg.sparsity_penalty

    def step_loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepOutput:
        """Reconstruction + sparsity_penalty * (L0 / target_l0 - 1)^2 (ramped)."""
        bandwidth = self.cfg.bandwidth
        # [batch, dict_size]
        pre = torch.addmm(self.ae.b_enc, self.ae._encoder_input(x), self.ae.W_enc)
        sparse, candidates = self.cfg.sparse, None
        # the (row, latent) pairs that can carry a code or a gradient, grouped by row
        if sparse is not False:
            lowest = self.ae.threshold.detach() - bandwidth / 2
            candidates = (pre.detach() > lowest).nonzero(as_tuple=True)
            if sparse is None:
                sparse = candidates[0].numel() <= SPARSE_MAX_DENSITY * pre.numel()
        if sparse:
            y_hat, f, l0, column_sums = self._sparse_forward(x, pre.detach(), *candidates)
        else:
            y_hat, f, l0, column_sums = self._dense_forward(x, pre)
        recon = (y - y_hat).pow(2).sum(dim=-1).mean()
        # the global batch's L0, with this rank's gradient (averaged over ranks:
        if self.distributed is not None:
            # the gradient of the global penalty)
            l0 = l0 - l0.detach() + self.global_mean(l0.detach())
        sparsity = (l0 / self.cfg.target_l0 - 1).pow(2)
        loss = recon + self.cfg.sparsity_penalty * sparsity * self.sparsity_warmup_fn(step)
        with torch.no_grad():
            fired = self.global_fired(column_sums > 0)  # upstream: fired if f.sum(0) > 0
            active = int((f.values != 0).sum()) if sparse else int((f != 0).sum())
        return StepOutput(loss, y_hat, fired, active / x.shape[0],
                          {"mse_loss": recon.item(), "l0_estimate": l0.item(),
                           "sparsity_loss": sparsity.item(), "sparse_step": float(sparse)},
                          {"code": f})

    def after_step(self, step: int, x: torch.Tensor, y: torch.Tensor, out: StepOutput) -> None:
        super().after_step(step, x, y, out)
        self.dead_features = int(self.dead.mask(self.cfg.dead_feature_threshold).sum())

    def logged_losses(self, y: torch.Tensor, out: StepOutput) -> dict[str, Any]:  # upstream's keys
        return {"l2_loss": out.metrics["mse_loss"], "loss": out.loss.item(),
                "l0": out.metrics["l0_estimate"], "sparsity_loss": out.metrics["sparsity_loss"]}

    def _dense_forward(self, x: torch.Tensor, pre: torch.Tensor):
        """Upstream's step: dense codes and decoding, all through autograd."""
        bandwidth = self.cfg.bandwidth
        f = JumpReLUFunction.apply(pre, self.ae.threshold, bandwidth)
        y_hat = self.ae.decode(f, x)
        l0 = StepFunction.apply(f, self.ae.threshold, bandwidth).sum(dim=-1).mean()
        return y_hat, f, l0, f.detach().sum(dim=0)

    def _sparse_forward(self, x: torch.Tensor, pre: torch.Tensor, rows: torch.Tensor,
                        cols: torch.Tensor):
        """The same step over the candidate pairs only. Every other pair has f = 0 and a zero kernel
        in both straight-through estimates except the L0 count's at f = 0, which depends only on the
        threshold: it is added once per latent, weighted by how many of the batch's rows it
        covers."""
        bandwidth = self.cfg.bandwidth
        n_rows, dict_size = pre.shape
        values = self.ae.gather_pre_activations(x, rows, cols, pre[rows, cols])
        threshold = self.ae.threshold[cols]  # [n_candidates]: gradients gather back per latent
        f = JumpReLUFunction.apply(values, threshold, bandwidth)
        code = SparseCode(f, rows, cols, n_rows)
        y_hat = self.ae.decode_sparse(code, x)
        counted = StepFunction.apply(f.detach(), threshold, bandwidth).sum()
        # [dict_size] pairs with f = 0
        outside = n_rows - torch.bincount(cols, minlength=dict_size).to(pre.dtype)
        zeros = torch.zeros_like(self.ae.threshold.detach())
        counted = counted + (StepFunction.apply(zeros, self.ae.threshold,
                                                bandwidth) * outside).sum()
        column_sums = (torch.zeros(dict_size, dtype=f.dtype, device=f.device)
                       .index_add_(0, cols, f.detach()))
        return y_hat, code, counted / n_rows, column_sums

"""JumpReluTrainer (Rajamanoharan et al. 2024) and its straight-through functions, at upstream's import path.

Loss: squared error summed over the output and averaged over the batch, plus
`sparsity_penalty * (L0 / target_l0 - 1)^2`, the penalty ramped in over `sparsity_warmup_steps`. The jump and the L0
count are step functions of the threshold; their threshold gradients are straight-through estimates with a
rectangle kernel of width `bandwidth` (`JumpReLUFunction`, `StepFunction`), the L0 count passing no gradient to the
pre-activations. As upstream, the L0 count is taken of the codes f (not of the pre-activations), Adam runs with
betas (0, 0.999), decoder rows are kept at unit norm (the gradient component along each row removed before the
step) and gradients are clipped to norm 1.

The step is sparse where the codes are: only pre-activations above `threshold - bandwidth / 2` can carry a code or a
gradient, so the encoder's backward and the decoder run over those (row, latent) pairs alone (`sparse.py` kernels).
When too many pairs qualify (early in training, when thresholds start at 0.001), the step runs densely instead; both
give the same loss and gradients.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import torch
from torch import autograd

from ..dictionary import Dictionary, JumpReluAutoEncoder, SparseCode
from .trainer import (SAETrainer, loss_arguments, remove_gradient_parallel_to_decoder_directions,
                      set_decoder_norm_to_unit_norm, sparsity_schedule, trainer_lr_schedule)

# what upstream's `JumpReluTrainer.loss(x, step=..., logging=True)` returns (its own field names)
LossLog = namedtuple("LossLog", ["x", "recon", "f", "losses"])
SPARSE_MAX_DENSITY = 0.1  # above this fraction of candidate (row, latent) pairs, the dense step is faster


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
    """x * 1[x > threshold]. Gradients: x gets the incoming gradient where the unit fires; the threshold gets the
    straight-through estimate -(threshold / bandwidth) * rectangle((x - threshold) / bandwidth) per element, summed
    to its own shape (so one threshold per latent collects over the batch)."""

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
            grad_threshold = (-(threshold / ctx.bandwidth) * kernel * grad_output).sum_to_size(threshold.shape)
        return grad_x, grad_threshold, None


class StepFunction(autograd.Function):
    """1[x > threshold]. Gradients: none to x; the threshold gets -(1 / bandwidth) * rectangle((x - threshold) /
    bandwidth) per element, summed to its own shape."""

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
            grad_threshold = (-(1.0 / ctx.bandwidth) * kernel * grad_output).sum_to_size(threshold.shape)
        return grad_x, grad_threshold, None


class JumpReluTrainer(SAETrainer):
    """Upstream's JumpReluTrainer: trains a `JumpReluAutoEncoder` (or a transcoder of that class) toward an average
    of `target_l0` active latents per token. Arguments up to `submodule_name` are upstream's, in its order."""

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type[Dictionary] = JumpReluAutoEncoder,
        seed: int | None = None,
        lr: float = 7e-5,
        bandwidth: float = 0.001,
        sparsity_penalty: float = 1.0,
        warmup_steps: int = 1000,
        sparsity_warmup_steps: int | None = 2000,
        decay_start: int | None = None,
        target_l0: float = 20.0,
        device: str | None = "cpu",
        wandb_name: str = "JumpRelu",
        submodule_name: str | None = None,
        *,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip: bool = False,
        dead_feature_threshold: int = 10_000_000,
        sparse: bool | None = None,
    ):
        """Beyond upstream: `output_dim`, `transcoder`, `skip` (a transcoder: batches are (x, y) pairs),
        `dead_feature_threshold` (tokens without firing before a latent counts as dead, for logging), and `sparse`
        (True / False forces the sparse / dense step; None picks by the batch's share of candidate pairs)."""
        for name, value in (("bandwidth", bandwidth), ("target_l0", target_l0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if sparsity_warmup_steps is not None and (not isinstance(sparsity_warmup_steps, int)
                                                  or sparsity_warmup_steps < 0):
            raise ValueError(f"sparsity_warmup_steps must be None or an int >= 0, got {sparsity_warmup_steps!r}")
        if sparse not in (None, True, False):
            raise ValueError(f"sparse must be None, True or False, got {sparse!r}")
        extra = {key: value for key, value in (("output_dim", output_dim), ("transcoder", transcoder),
                                               ("skip", skip)) if value}  # upstream-style classes take none
        super().__init__(
            seed, steps=steps, lr=lr, warmup_steps=warmup_steps, decay_start=decay_start,
            dead_feature_threshold=dead_feature_threshold, device=device,
            build_dictionary=lambda: dict_class(activation_dim=activation_dim, dict_size=dict_size, device=device,
                                                **extra),
            build_optimizer=lambda ae: torch.optim.Adam(ae.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8),
            lr_lambda=trainer_lr_schedule(steps, warmup_steps, decay_start, None, sparsity_warmup_steps),
            config={"layer": layer, "lm_name": lm_name, "wandb_name": wandb_name, "submodule_name": submodule_name,
                    "bandwidth": bandwidth, "sparsity_penalty": sparsity_penalty,
                    "sparsity_warmup_steps": sparsity_warmup_steps, "target_l0": target_l0},
        )
        # upstream's attributes
        self.layer, self.lm_name, self.submodule_name, self.wandb_name = layer, lm_name, submodule_name, wandb_name
        self.bandwidth, self.sparsity_coefficient, self.target_l0 = float(bandwidth), sparsity_penalty, target_l0
        self.warmup_steps, self.decay_start = warmup_steps, decay_start
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self.sparsity_warmup_fn = sparsity_schedule(sparsity_warmup_steps)
        self.dead_feature_threshold = dead_feature_threshold
        self.dead_features = -1
        self.logging_parameters = ["dead_features"]
        self.sparse = sparse

    # the loss --------------------------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, y: torch.Tensor | None = None,
             **kwargs: Any):
        """Reconstruction + sparsity_penalty * (L0 / target_l0 - 1)^2 (ramped), as upstream's `loss(x, step,
        logging)`: with `logging`, returns upstream's LossLog(x, recon, f, losses) and changes no training state.
        Transcoders pass their target as `y`; this toolkit's positional form `loss(x, y, step)` works too."""
        if isinstance(step, torch.Tensor):  # loss(x, y, step)
            y, step, logging = step, logging, False
        y, step = loss_arguments(x, y, step)
        x = x.to(self.ae.W_enc.dtype)
        y = y.to(self.ae.W_enc.dtype)
        pre = torch.addmm(self.ae.b_enc, self.ae._encoder_input(x), self.ae.W_enc)  # [batch, dict_size]
        sparse, candidates = self.sparse, None
        if sparse is not False:  # the (row, latent) pairs that can carry a code or a gradient, grouped by row
            candidates = (pre.detach() > self.ae.threshold.detach() - self.bandwidth / 2).nonzero(as_tuple=True)
            if sparse is None:
                sparse = candidates[0].numel() <= SPARSE_MAX_DENSITY * pre.numel()
        if sparse:
            y_hat, f, l0, column_sums = self._sparse_forward(x, pre.detach(), *candidates)
        else:
            y_hat, f, l0, column_sums = self._dense_forward(x, pre)
        recon = (y - y_hat).pow(2).sum(dim=-1).mean()
        if self.distributed is not None:  # the global batch's L0, with this rank's gradient (averaged over ranks:
            l0 = l0 - l0.detach() + self._global_mean(l0.detach())  # the gradient of the global penalty)
        sparsity = (l0 / self.target_l0 - 1).pow(2)
        loss = recon + self.sparsity_coefficient * sparsity * self.sparsity_warmup_fn(step)
        if logging:
            f = f if not sparse else f.to_dense(self.ae.dict_size)
            return LossLog(x, y_hat, f, {"l2_loss": recon.item(), "loss": loss.item(), "l0": l0.item(),
                                         "sparsity_loss": sparsity.item()})
        with torch.no_grad():
            self._track((column_sums > 0).nonzero().flatten(), x.shape[0])  # upstream: fired if f.sum(0) > 0
            self.dead_features = int((self.num_tokens_since_fired > self.dead_feature_threshold).sum())
            active = int((f.values != 0).sum()) if sparse else int((f != 0).sum())
        self._record(y, y_hat.detach(), active / x.shape[0], loss, mse_loss=recon.item(), l0_estimate=l0.item(),
                     sparsity_loss=sparsity.item(), sparse_step=float(sparse), dead_features=self.dead_features)
        return loss

    def update(self, step: int, x: Any) -> float:
        """One training step (upstream's `update(step, x)`): x a batch `[batch, activation_dim]`, or an (x, y) pair
        for transcoders; returns the loss."""
        return super().update(step, x)

    def _dense_forward(self, x: torch.Tensor, pre: torch.Tensor):
        """Upstream's step: dense codes and decoding, all through autograd."""
        f = JumpReLUFunction.apply(pre, self.ae.threshold, self.bandwidth)
        y_hat = self.ae.decode(f, x)
        l0 = StepFunction.apply(f, self.ae.threshold, self.bandwidth).sum(dim=-1).mean()
        return y_hat, f, l0, f.detach().sum(dim=0)

    def _sparse_forward(self, x: torch.Tensor, pre: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        """The same step over the candidate pairs only. Every other pair has f = 0 and a zero kernel in both
        straight-through estimates except the L0 count's at f = 0, which depends only on the threshold: it is
        added once per latent, weighted by how many of the batch's rows it covers."""
        n_rows, dict_size = pre.shape
        values = self.ae.gather_pre_activations(x, rows, cols, pre[rows, cols])
        threshold = self.ae.threshold[cols]  # [n_candidates]: gradients gather back per latent
        f = JumpReLUFunction.apply(values, threshold, self.bandwidth)
        code = SparseCode(f, rows, cols, n_rows)
        y_hat = self.ae.decode_sparse(code, x)
        counted = StepFunction.apply(f.detach(), threshold, self.bandwidth).sum()
        outside = n_rows - torch.bincount(cols, minlength=dict_size).to(pre.dtype)  # [dict_size] pairs with f = 0
        zeros = torch.zeros_like(self.ae.threshold.detach())
        counted = counted + (StepFunction.apply(zeros, self.ae.threshold, self.bandwidth) * outside).sum()
        column_sums = torch.zeros(dict_size, dtype=f.dtype, device=f.device).index_add_(0, cols, f.detach())
        return y_hat, code, counted / n_rows, column_sums

    # decoder geometry ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component along each (unit) decoder row."""
        weight = self.ae.W_dec
        if weight.grad is not None:
            remove_gradient_parallel_to_decoder_directions(weight.t(), weight.grad.t(), self.ae.output_dim,
                                                           self.ae.dict_size)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        set_decoder_norm_to_unit_norm(self.ae.W_dec.t(), self.ae.output_dim, self.ae.dict_size)

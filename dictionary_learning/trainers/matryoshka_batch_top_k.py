"""MatryoshkaBatchTopKTrainer (Bussmann et al. 2025), at upstream's import path with its `MatryoshkaBatchTopKSAE`
and `apply_temperature`.

Loss: for each active group g, the squared error (summed over the output, averaged over the batch) of the prefix
reconstruction that uses only the active latents of groups 0..g, times `group_weights[g]`; the mean of these over the
groups, plus `auxk_alpha` times the AuxK loss (the `top_k_aux` largest dead latents reconstruct the full
reconstruction's residual, normalised by its variance). Codes are the batch's k*batch largest; the inference
threshold is an exponential moving average of the smallest kept code after `threshold_start_step`. b_dec starts at
the geometric median of the first batch's targets; decoder rows stay at unit norm, with the parallel gradient removed
before each step; gradients are clipped to norm 1; upstream's lr schedule. `k_anneal_steps` anneals k linearly from
activation_dim down to k. The step decodes only the k*batch active latents, never a dense [batch, dict_size] code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..dictionary import Dictionary, MatryoshkaBatchTopKSAE, SparseCode
from .top_k import default_topk_lr
from .trainer import (
    LossLog,
    SAETrainer,
    remove_gradient_parallel_to_decoder_directions,
    set_decoder_norm_to_unit_norm,
    split_batch,
    trainer_lr_schedule,
    upstream_loss_call,
)
from .top_k import DENSE_AUXK_SHARE
from .trainer import geometric_median as _geometric_median



def apply_temperature(probabilities: list[float], temperature: float) -> list[float]:
    """Sharpen (temperature < 1) or flatten (> 1) a probability distribution: p_i^(1/T), renormalised."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logits = torch.tensor(probabilities, dtype=torch.float32).log() / temperature
    return torch.softmax(logits, dim=0).tolist()


def group_sizes_from_fractions(group_fractions: Sequence[float], dict_size: int) -> list[int]:
    """Upstream's split: int(fraction * dict_size) latents for each group but the last, which takes the rest."""
    if not isinstance(group_fractions, Sequence) or not group_fractions:
        raise ValueError(f"group_fractions must be a non-empty list of fractions summing to 1, got {group_fractions!r}")
    if not math.isclose(sum(group_fractions), 1.0):
        raise ValueError(f"group_fractions must sum to 1.0, got {list(group_fractions)} (sum {sum(group_fractions)})")
    sizes = [int(fraction * dict_size) for fraction in group_fractions[:-1]]
    return sizes + [dict_size - sum(sizes)]


class MatryoshkaBatchTopKTrainer(SAETrainer):
    """Trains a `MatryoshkaBatchTopKSAE` (or a transcoder of that class). Upstream's parameters in upstream's order;
    this toolkit's extras are keyword-only: output_dim / transcoder / skip, dead_feature_threshold (tokens without
    firing after which a latent counts as dead), top_k_aux (default output_dim // 2), encoder_dtype (as
    TopKTrainer's: the dense encoder GEMM that chooses the latents in bfloat16, "auto" where that is fast)."""

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        k: int,
        layer: int | None = None,
        lm_name: str | None = None,
        group_fractions: list[float] | None = None,
        group_weights: list[float] | None = None,
        dict_class: type[Dictionary] = MatryoshkaBatchTopKSAE,
        lr: float | None = None,
        auxk_alpha: float = 1 / 32,
        warmup_steps: int = 1000,
        decay_start: int | None = None,
        threshold_beta: float = 0.999,
        threshold_start_step: int = 1000,
        k_anneal_steps: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str = "BatchTopKSAE",
        submodule_name: str | None = None,
        *,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip: bool = False,
        dead_feature_threshold: int = 10_000_000,
        top_k_aux: int | None = None,
        encoder_dtype: torch.dtype | str | None = None,
    ):
        if group_fractions is None:
            raise ValueError("group_fractions is required: the fraction of dict_size in each nested group, e.g. "
                             "[0.25, 0.25, 0.5]")
        group_sizes = group_sizes_from_fractions(group_fractions, dict_size)
        if group_weights is None:
            group_weights = [1.0 / len(group_sizes)] * len(group_sizes)
        if len(group_weights) != len(group_sizes):
            raise ValueError(f"group_weights needs one weight per group ({len(group_sizes)}), got {group_weights}")
        if k_anneal_steps is not None:
            if type(k_anneal_steps) is not int or not 0 < k_anneal_steps < steps:
                raise ValueError(f"k_anneal_steps must be an int in (0, steps={steps}), got {k_anneal_steps!r}")
            if not activation_dim > k:
                raise ValueError(f"k annealing starts at activation_dim={activation_dim}, which must exceed k={k}")
        extras: dict[str, Any] = {}  # passed only when asked for, so upstream-style dict classes work too
        if output_dim is not None:
            extras["output_dim"] = output_dim
        if transcoder or skip:
            extras.update(transcoder=True, skip=bool(skip))
        lr = lr if lr is not None else default_topk_lr(dict_size)
        config = {"layer": layer, "lm_name": lm_name, "group_fractions": list(group_fractions),
                  "group_weights": list(group_weights), "group_sizes": group_sizes, "auxk_alpha": auxk_alpha,
                  "threshold_beta": threshold_beta, "threshold_start_step": threshold_start_step,
                  "k_anneal_steps": k_anneal_steps, "wandb_name": wandb_name, "submodule_name": submodule_name}
        super().__init__(
            seed, steps=steps, lr=lr, warmup_steps=warmup_steps, decay_start=decay_start,
            dead_feature_threshold=dead_feature_threshold, device=device, config=config,
            build_dictionary=lambda: dict_class(activation_dim, dict_size, k, group_sizes, **extras),
            lr_lambda=trainer_lr_schedule(steps, warmup_steps, decay_start),
        )
        self.layer, self.lm_name, self.submodule_name, self.wandb_name = layer, lm_name, submodule_name, wandb_name
        self.warmup_steps, self.decay_start = warmup_steps, decay_start
        self.k, self.k_anneal_steps = k, k_anneal_steps  # the target k; the dictionary's `k` buffer is the current one
        self.group_fractions, self.group_sizes, self.group_weights = list(group_fractions), group_sizes, group_weights
        self.auxk_alpha = auxk_alpha
        self.threshold_beta, self.threshold_start_step = threshold_beta, threshold_start_step
        self.dead_feature_threshold = dead_feature_threshold
        self.top_k_aux = top_k_aux if top_k_aux is not None else self.ae.output_dim // 2
        self._config["top_k_aux"] = self.top_k_aux
        self._set_encoder_dtype(encoder_dtype)
        self._b_dec_initialised = False
        self._step = 0
        self.logging_parameters = ["effective_l0", "dead_features", "pre_norm_auxk_loss"]
        self.effective_l0 = self.dead_features = self.pre_norm_auxk_loss = -1

    # the loss -------------------------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, y: torch.Tensor | None = None,
             **kwargs: Any):
        """The nested loss on a batch, upstream's call `loss(x, step, logging)` (transcoders pass their target as `y`;
        `loss(x, y, step)` works too); with logging, a LossLog (x, x_hat, dense f, losses). Updates dead-latent
        tracking and, after threshold_start_step, the threshold."""
        y, step, logging = upstream_loss_call(x, step, logging, y)
        ae = self.ae
        pre = ae.pre_activations(x, self.encoder_dtype)  # [batch, dict_size], no grad
        if self.distributed is None:
            code = ae.sparse_code(x, pre)
        else:  # the global batch's k * batch largest codes, then the inactive groups dropped (as ae.batch_topk)
            rows, cols, values = self._global_batch_topk(pre, int(ae.k) * x.shape[0])
            keep = cols < ae.active_end
            code = ae.gather_code(x, rows[keep], cols[keep], values[keep], x.shape[0])
        if step > self.threshold_start_step:
            self.update_threshold(code.values)
        prefixes = ae.decode_prefixes(code, x)  # one [batch, output_dim] reconstruction per active group
        l2_losses = torch.stack([(y - prefix).pow(2).sum(dim=-1).mean() * weight
                                 for prefix, weight in zip(prefixes, self.group_weights)])  # [groups]
        l2_loss = l2_losses.mean()
        y_hat = prefixes[-1]
        with torch.no_grad():
            fired = torch.zeros(ae.dict_size, dtype=torch.bool, device=x.device)
            fired[code.cols[code.values > 0]] = True
            self._track(fired, x.shape[0])
            self.effective_l0 = (code.values > 0).sum().item() / x.shape[0]
        auxk = self._auxk_loss(x, (y - y_hat).detach(), pre)
        loss = l2_loss + self.auxk_alpha * auxk
        losses = {"l2_loss": l2_loss.item(), "auxk_loss": auxk.item(), "loss": loss.item(),
                  "min_l2_loss": l2_losses.min().item(), "max_l2_loss": l2_losses.max().item()}
        self._record(y, y_hat.detach(), self.effective_l0, loss, **{k: v for k, v in losses.items() if k != "loss"})
        if logging:
            return LossLog(x, y_hat.detach(), code.to_dense(ae.dict_size).detach(), losses)
        return loss

    def _auxk_loss(self, x: torch.Tensor, residual: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """AuxK, never over all latents: when the top_k_aux codes are a large share of the dead latents' (as with
        upstream's top_k_aux = d // 2), a dense code over the dead columns only (two small GEMMs); otherwise only the
        top_k_aux dead latents of each row are gathered (sparse kernels)."""
        dead = self.num_tokens_since_fired >= self.dead_feature_threshold
        self.dead_features = int(dead.sum())
        if self.dead_features == 0 or self.auxk_alpha == 0:
            self.pre_norm_auxk_loss = -1
            return torch.zeros((), dtype=x.dtype, device=x.device)
        k_aux = min(self.top_k_aux, self.dead_features)
        dead_ids = dead.nonzero().flatten()
        if DENSE_AUXK_SHARE * self.dead_features <= k_aux:
            weight, bias = self.ae._encoder_affine()
            post = F.linear(x, weight[dead_ids], bias[dead_ids]).relu()  # [batch, n_dead]
            with torch.no_grad():
                keep = torch.zeros_like(post, dtype=torch.bool).scatter_(1, post.topk(k_aux, dim=-1).indices, True)
            return self._normalised_auxk(residual, (post * keep) @ self.ae.W_dec[dead_ids])
        with torch.no_grad():
            values, local = pre.index_select(1, dead_ids).topk(k_aux, dim=-1, sorted=False)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k_aux)
        code = self.ae.gather_code(x, rows, dead_ids[local].flatten(), values.flatten(), x.shape[0])
        return self._normalised_auxk(residual, self.ae.decode_sparse(code, bias=False))

    def _normalised_auxk(self, residual: torch.Tensor, residual_hat: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(residual.dtype, torch.float32)  # at least float32 (low-precision training)
        residual, residual_hat = residual.to(dtype), residual_hat.to(dtype)
        error = (residual - residual_hat).pow(2).sum(dim=-1).mean()
        self.pre_norm_auxk_loss = error.item()
        with torch.no_grad():  # the residual's variance over the (global) batch
            center = self._global_mean(residual.mean(dim=0))
            variance = self._global_mean((residual - center).pow(2).sum(dim=-1).mean())
        return (error / variance).nan_to_num(0.0)

    def get_auxiliary_loss(self, residual_BD: torch.Tensor, post_relu_acts_BF: torch.Tensor) -> torch.Tensor:
        """Upstream's AuxK from dense post-relu codes `[batch, dict_size]` (differentiable through them)."""
        dead = self.num_tokens_since_fired >= self.dead_feature_threshold
        self.dead_features = int(dead.sum())
        if self.dead_features == 0:
            self.pre_norm_auxk_loss = -1
            return torch.zeros((), dtype=residual_BD.dtype, device=residual_BD.device)
        k_aux = min(self.top_k_aux, self.dead_features)
        with torch.no_grad():
            cols = post_relu_acts_BF.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1, sorted=False).indices
        n = post_relu_acts_BF.shape[0]
        rows = torch.arange(n, device=cols.device).repeat_interleave(k_aux)
        code = SparseCode(post_relu_acts_BF.gather(1, cols).flatten(), rows, cols.flatten(), n)
        return self._normalised_auxk(residual_BD, self.ae.decode_sparse(code, bias=False))

    @torch.no_grad()
    def update_threshold(self, f: torch.Tensor) -> None:
        """Move the inference threshold towards the smallest positive code in `f` (any shape)."""
        active = f[f > 0]
        smallest = self._global_min(active.min().float() if active.numel() else torch.full((), torch.inf,
                                                                                           device=f.device))
        if not torch.isfinite(smallest):  # no positive code in the (global) batch
            smallest = torch.zeros((), device=f.device)
        threshold = self.ae.threshold
        if threshold < 0:
            threshold.copy_(smallest)
        else:
            threshold.copy_(self.threshold_beta * threshold.float() + (1 - self.threshold_beta) * smallest)

    # the step -------------------------------------------------------------------------------------------------
    def update(self, step: int, x: Any) -> float:
        """One training step on a batch x (or an (x, y) pair for transcoders); on the first, b_dec goes to the
        geometric median of the batch's targets."""
        if step == 0 and not self._b_dec_initialised:
            _, y = split_batch(x, self.ae)
            with torch.no_grad():
                self.ae.b_dec.copy_(_geometric_median(self._global_rows(y.to(self.ae.b_dec.device)))
                                    .to(self.ae.b_dec.dtype))
            self._b_dec_initialised = True
        self._step = step
        return super().update(step, x)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row."""
        weight = self.ae.W_dec
        if weight.grad is not None:
            remove_gradient_parallel_to_decoder_directions(weight.t(), weight.grad.t(), self.ae.output_dim,
                                                           self.ae.dict_size)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.update_annealed_k(self._step, self.ae.activation_dim, self.k_anneal_steps)
        set_decoder_norm_to_unit_norm(self.ae.W_dec.t(), self.ae.output_dim, self.ae.dict_size)

    def update_annealed_k(self, step: int, activation_dim: int, k_anneal_steps: int | None = None) -> None:
        """Set the dictionary's k to activation_dim -> self.k linearly over k_anneal_steps (None: leave it)."""
        if k_anneal_steps is None:
            return
        ratio = min(step, k_anneal_steps) / k_anneal_steps
        self.ae.k.fill_(int(activation_dim * (1 - ratio) + self.k * ratio))

    @staticmethod
    def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
        """The point minimising the summed distance to `points` [n, d] (Weiszfeld's algorithm)."""
        return _geometric_median(points, max_iter, tol)

    def _extra_state(self) -> dict[str, Any]:
        return {"b_dec_initialised": self._b_dec_initialised}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._b_dec_initialised = state.get("b_dec_initialised", False)

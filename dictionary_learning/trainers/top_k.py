"""TopKTrainer (Gao et al. 2024); BatchTopKTrainer (Bussmann et al. 2024) builds on it in `batch_top_k.py`.

Loss: squared error summed over the output and averaged over the batch, plus `auxk_alpha` times the AuxK loss:
the k_aux largest pre-activations among dead latents (no token fired them for `dead_feature_threshold` tokens)
reconstruct the main reconstruction's residual, normalised by the residual's variance. Decoder rows are kept at unit
norm, with the gradient component parallel to each row removed before the step. b_dec starts at the geometric
median of the first batch's targets. The step never builds dense [batch, dict_size] codes or code gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..dictionary import AutoEncoderTopK, Dictionary, SparseCode
from .trainer import (
    SAETrainer,
    geometric_median,
    upstream_loss_call,
    remove_gradient_parallel_to_decoder_directions,
    set_decoder_norm_to_unit_norm,
)


DENSE_AUXK_SHARE = 0.1  # AuxK codes dense over the dead columns when k_aux >= this share of the dead latents


def default_topk_lr(dict_size: int) -> float:
    """Gao et al. 2024's scaling: 2e-4 at 2**14 latents, times 1/sqrt(dict_size / 2**14)."""
    return 2e-4 / math.sqrt(dict_size / 2**14)


class TopKTrainer(SAETrainer):
    """Trains an `AutoEncoderTopK` (or a transcoder of that class)."""

    default_dict_class: type[Dictionary] = AutoEncoderTopK

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        k: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type[Dictionary] | None = None,
        lr: float | None = None,
        auxk_alpha: float = 1 / 32,
        warmup_steps: int = 1000,
        decay_start: int | None = None,
        threshold_beta: float = 0.999,
        threshold_start_step: int | None = None,
        k_anneal_steps: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str = "TopKTrainer",
        submodule_name: str | None = None,
        *,
        k_aux: int | None = None,
        dead_feature_threshold: int = 10_000_000,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip: bool = False,
        encoder_dtype: torch.dtype | str | None = None,
    ):
        """Upstream's parameters in upstream's (HEAD's) order, then this toolkit's: `k_aux` (AuxK's k, default half
        the output width), `dead_feature_threshold` (tokens without firing before a latent counts as dead), and the
        transcoder options; `encoder_dtype` ("auto", torch.bfloat16, ...) runs the dense encoder GEMM that chooses
        the active latents in that dtype (weights, Adam state and the chosen codes' values and gradients stay in
        the activations' dtype; "auto": bfloat16 where the hardware is fast at it). `threshold_start_step` defaults
        to min(1000, steps // 10) (upstream: 1000), so short runs learn an inference threshold too; `k_anneal_steps`
        anneals k linearly from the input width down to `k`."""
        dict_class = dict_class or self.default_dict_class
        if k_anneal_steps is not None and not 0 <= k_anneal_steps < steps:
            raise ValueError(f"k_anneal_steps must be in [0, steps={steps}), got {k_anneal_steps}")
        if k_anneal_steps is not None and activation_dim <= k:
            raise ValueError(f"k annealing starts at activation_dim={activation_dim}, which must exceed k={k}")
        super().__init__(
            seed, steps=steps, lr=lr if lr is not None else default_topk_lr(dict_size), warmup_steps=warmup_steps,
            decay_start=decay_start, dead_feature_threshold=dead_feature_threshold, device=device, adam_eps=6.25e-10,
            build_dictionary=lambda: dict_class(activation_dim, dict_size, k, output_dim=output_dim,
                                                transcoder=transcoder, skip=skip),
            config={"layer": layer, "lm_name": lm_name, "wandb_name": wandb_name, "submodule_name": submodule_name},
        )
        self.k = k  # upstream's attribute: the target k; the dictionary's `k` buffer is what is used
        self.k_anneal_steps = k_anneal_steps
        self.auxk_alpha = auxk_alpha
        self.k_aux = k_aux if k_aux is not None else self.ae.output_dim // 2
        self.top_k_aux = self.k_aux  # upstream's name
        self.dead_feature_threshold = dead_feature_threshold  # upstream's name
        if threshold_start_step is None:  # upstream's 1000, but within short runs too
            threshold_start_step = min(1000, steps // 10)
        self.threshold_beta, self.threshold_start_step = threshold_beta, threshold_start_step
        self._b_dec_initialised = False  # b_dec goes to the geometric median of the first batch, once
        self.logging_parameters = ["effective_l0", "dead_features", "pre_norm_auxk_loss"]
        self.effective_l0 = self.dead_features = self.pre_norm_auxk_loss = -1.0
        self._config.update(auxk_alpha=auxk_alpha, k_aux=self.k_aux, threshold_beta=threshold_beta,
                            threshold_start_step=threshold_start_step, k_anneal_steps=k_anneal_steps)
        self._set_encoder_dtype(encoder_dtype)
        self.update_annealed_k(0, activation_dim, k_anneal_steps)

    geometric_median = staticmethod(geometric_median)  # upstream's BatchTopKTrainer.geometric_median

    # code selection: TopK per token (BatchTopK overrides) --------------------------------------------------------
    def _code(self, x: torch.Tensor, pre: torch.Tensor, step: int) -> SparseCode:
        code = self.ae.sparse_code(x, pre)
        if step > self.threshold_start_step:  # upstream: the mean over tokens of each token's smallest kept code
            self.update_threshold(code.values.detach().reshape(x.shape[0], -1))
        return code

    @torch.no_grad()
    def update_threshold(self, top_acts_BK: torch.Tensor) -> None:
        """Upstream's inference threshold: an exponential moving average (beta `threshold_beta`) of the mean over
        tokens of each token's smallest positive kept code `[batch, k]`. Tokens with no positive kept code are left
        out of the mean (upstream counts them as +inf, which sets the threshold to inf for good: every later code
        would be zero), and a batch without any positive code leaves the threshold as it was."""
        active = top_acts_BK.float().masked_fill(top_acts_BK <= 0, float("inf"))
        smallest = active.min(dim=1).values
        finite = torch.isfinite(smallest)
        total = self._global_mean(torch.where(finite, smallest, 0.0).sum())  # sums and counts over the global batch
        count = self._global_mean(finite.sum().float())
        if count > 0:
            self._move_threshold(total / count)

    @torch.no_grad()
    def _move_threshold(self, value: torch.Tensor) -> None:
        value = value.to(self.ae.threshold.dtype)
        if self.ae.threshold < 0:
            self.ae.threshold.copy_(value)
        else:
            self.ae.threshold.mul_(self.threshold_beta).add_((1 - self.threshold_beta) * value)

    @torch.no_grad()
    def update_annealed_k(self, step: int, activation_dim: int, k_anneal_steps: int | None = None) -> None:
        """Upstream's k annealing: k falls linearly from `activation_dim` at step 0 to the target `k` at step
        `k_anneal_steps` (nothing without `k_anneal_steps`)."""
        if k_anneal_steps is None:
            return
        ratio = min(step, k_anneal_steps) / k_anneal_steps if k_anneal_steps else 1.0
        self.ae.k.fill_(int(activation_dim * (1 - ratio) + self.k * ratio))

    def update(self, step: int, x: Any) -> float:
        """One training step (upstream's `update(step, x)`): x a batch, or an (x, y) pair for transcoders."""
        loss = super().update(step, x)
        self.update_annealed_k(step + 1, self.ae.activation_dim, self.k_anneal_steps)
        return loss

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, y: torch.Tensor | None = None,
             **kwargs: Any):
        """Reconstruction + auxk_alpha * AuxK, upstream's call `loss(x, step, logging)` (transcoders pass their
        target as `y`; `loss(x, y, step)` works too). With `logging`, returns upstream's LossLog(x, x_hat, f,
        losses) and changes no training state."""
        y, step, logging = upstream_loss_call(x, step, logging, y)
        if logging:
            return self.loss_log(x, y)
        if step == 0 and not self._b_dec_initialised:
            with torch.no_grad():  # b_dec at the geometric median of the first targets
                self.ae.b_dec.copy_(geometric_median(self._global_rows(y)).to(self.ae.b_dec.dtype))
            self._b_dec_initialised = True
        pre = self.ae.pre_activations(x, self.encoder_dtype)  # [batch, dict_size], no grad
        code = self._code(x, pre, step)
        y_hat = self.ae.decode_sparse(code, x)
        mse = (y - y_hat).pow(2).sum(dim=-1).mean()
        with torch.no_grad():
            fired = code.cols[code.values > 0].unique()
            self._track(fired, x.shape[0])
            self.effective_l0 = (code.values > 0).sum().item() / x.shape[0]
        auxk = self._auxk_loss(x, y - y_hat.detach(), pre)
        loss = mse + self.auxk_alpha * auxk
        self._record(y, y_hat.detach(), self.effective_l0, loss, auxk_loss=auxk.item(), mse_loss=mse.item())
        return loss

    def get_auxiliary_loss(self, residual_BD: torch.Tensor, post_relu_acts_BF: torch.Tensor) -> torch.Tensor:
        """Upstream's AuxK loss on dense post-relu codes `[batch, dict_size]`: the top-k_aux dead latents'
        reconstruction of the residual, its squared error normalised by the residual's variance (the training step
        computes the same quantity sparsely)."""
        dead = self.dead_mask(self.dead_threshold_tokens)
        self.dead_features = int(dead.sum())
        if self.dead_features == 0:
            self.pre_norm_auxk_loss = -1
            return torch.zeros((), dtype=residual_BD.dtype, device=residual_BD.device)
        k_aux = min(self.k_aux, self.dead_features)
        values, indices = post_relu_acts_BF.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        codes = torch.zeros_like(post_relu_acts_BF).scatter(-1, indices, values)
        error = (residual_BD.float() - self.ae.decoder(codes).float()).pow(2).sum(dim=-1).mean()
        self.pre_norm_auxk_loss = error
        variance = (residual_BD.float() - residual_BD.float().mean(dim=0)).pow(2).sum(dim=-1).mean()
        return (error / variance).nan_to_num(0.0)

    def _auxk_loss(self, x: torch.Tensor, residual: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """Normalised error of reconstructing the residual from the top-k_aux dead latents (0 if none is dead)."""
        dead = self.dead_mask(self.dead_threshold_tokens)
        n_dead = int(dead.sum())
        self.dead_features = n_dead
        if n_dead == 0 or self.auxk_alpha == 0:
            self.pre_norm_auxk_loss = 0.0
            return torch.zeros((), device=x.device, dtype=x.dtype)
        k_aux = min(self.k_aux, n_dead)
        dead_ids = dead.nonzero().flatten()
        if DENSE_AUXK_SHARE * n_dead <= k_aux:  # the codes fill a large share of the dead columns: two small GEMMs
            weight, bias = self.ae._encoder_affine()
            post = F.linear(x, weight[dead_ids], bias[dead_ids]).relu()  # [batch, n_dead]
            with torch.no_grad():
                keep = torch.zeros_like(post, dtype=torch.bool).scatter_(1, post.topk(k_aux, dim=-1).indices, True)
            residual_hat = (post * keep) @ self.ae.decoder.weight[:, dead_ids].t()
        else:  # top-k over the dead columns only, gathered and decoded sparsely
            with torch.no_grad():
                values, local = pre.index_select(1, dead_ids).topk(k_aux, dim=-1, sorted=False)
                cols = dead_ids[local]
            rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k_aux)
            code = self.ae.gather_code(x, rows, cols.reshape(-1), values.reshape(-1), x.shape[0])
            residual_hat = self.ae.decode_sparse(code, bias=False)
        error = (residual - residual_hat).pow(2).sum(dim=-1).mean()
        self.pre_norm_auxk_loss = error.item()
        with torch.no_grad():  # the residual's variance over the (global) batch
            center = self._global_mean(residual.mean(dim=0))
            scale = self._global_mean((residual - center).pow(2).sum(dim=-1).mean()).clamp_min(1e-12)
        return (error / scale).nan_to_num(0.0)

    # decoder geometry ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder column."""
        weight = self.ae.decoder.weight
        if weight.grad is not None:
            remove_gradient_parallel_to_decoder_directions(weight, weight.grad, self.ae.output_dim, self.ae.dict_size)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        set_decoder_norm_to_unit_norm(self.ae.decoder.weight, self.ae.output_dim, self.ae.dict_size)

    def _extra_state(self) -> dict[str, Any]:
        return {"b_dec_initialised": self._b_dec_initialised}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._b_dec_initialised = state.get("b_dec_initialised", False)

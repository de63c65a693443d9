"""GatedSAETrainer (Rajamanoharan et al. 2024, GDM): upstream's trainers.gdm, also for gated transcoders.

Loss, with y the target (y = x for SAEs), pre the encoder projection and g = relu(pre + b_gate) the gate path:

    L = |y - y_hat|^2 + l1_penalty * s(step) * |g|_1 + |y - (W_dec g + b_dec)|^2

summed over the output and averaged over the batch. The last (auxiliary) term decodes the gate path through a
*detached* decoder and decoder bias (and skip), so it trains only the encoder and b_gate; the gate's step function in
y_hat passes no gradient. s(step) ramps the sparsity penalty from 0 to 1 over `sparsity_warmup_steps`. Decoder
columns stay at unit norm (the gradient component parallel to each column is removed before the Adam step, columns
renormalised after; Adam betas (0, 0.999)); the lr warms up linearly from 0 and optionally decays linearly to 0 from
`decay_start`; no gradient clipping. The optimizer and schedules below are shared with `gated_anneal.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..dictionary import Dictionary, GatedAutoEncoder
from .trainer import ConstrainedAdam, SAETrainer, sparsity_schedule, trainer_lr_schedule, upstream_loss_call

# ----------------------------------------------------------------------------------------------------------------
# schedules and optimizer (upstream's: trainer.ConstrainedAdam, trainer_lr_schedule, sparsity_schedule)


def checked_warmups(steps: int, warmup_steps: int, sparsity_warmup_steps: int | None) -> tuple[int, int | None]:
    """(warmup_steps, sparsity_warmup_steps) validated and capped at `steps` (upstream requires both < steps)."""
    for name, value in (("warmup_steps", warmup_steps), ("sparsity_warmup_steps", sparsity_warmup_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return min(warmup_steps, steps), None if sparsity_warmup_steps is None else min(sparsity_warmup_steps, steps)


def use_gated_optimizer(trainer: SAETrainer, lr: float, lr_factor: Callable[[int], float]) -> None:
    """Replace the base's Adam and schedule by upstream's: ConstrainedAdam (betas (0, 0.999)) on every parameter,
    the decoder's columns constrained, and `lr_factor` as the lr schedule; no gradient clipping."""
    trainer.optimizer = ConstrainedAdam(trainer.ae.parameters(), trainer.ae.decoder.parameters(), lr=lr,
                                        betas=(0.0, 0.999))
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lr_factor)
    trainer.max_grad_norm = None


# ----------------------------------------------------------------------------------------------------------------
# the gated loss terms


def gated_terms(ae: GatedAutoEncoder, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_hat, f, gate, reconstruction loss, auxiliary loss) of a gated dictionary on a batch; `gate` is the gate
    path relu(pre + b_gate) `[batch, dict_size]`, decoded for the auxiliary loss through the detached decoder."""
    f, gate = ae.encode(x, return_gate=True)  # [batch, dict_size] each
    y_hat = ae.decode(f, x=x)
    y_hat_gate = gate @ ae.decoder.weight.detach().T + ae.decoder_bias.detach()
    if ae.skip is not None:
        y_hat_gate = y_hat_gate + ae.skip(x).detach()
    reconstruction = (y - y_hat).pow(2).sum(dim=-1).mean()
    auxiliary = (y - y_hat_gate).pow(2).sum(dim=-1).mean()
    return y_hat, f, gate, reconstruction, auxiliary


# ----------------------------------------------------------------------------------------------------------------
# the trainer


class GatedSAETrainer(SAETrainer):
    """Trains a `GatedAutoEncoder` (or a gated transcoder: `output_dim`, `transcoder`, `skip`)."""

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type[Dictionary] = GatedAutoEncoder,
        lr: float = 5e-5,
        l1_penalty: float = 1e-1,
        warmup_steps: int = 1000,
        sparsity_warmup_steps: int | None = 2000,
        decay_start: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str | None = "GatedSAETrainer",
        submodule_name: str | None = None,
        *,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip: bool = False,
    ):
        warmup_steps, sparsity_warmup_steps = checked_warmups(steps, warmup_steps, sparsity_warmup_steps)
        super().__init__(
            seed, steps=steps, lr=lr, warmup_steps=warmup_steps, decay_start=decay_start, device=device,
            build_dictionary=lambda: dict_class(activation_dim, dict_size, output_dim=output_dim,
                                                transcoder=transcoder, skip=skip),
            config={"l1_penalty": l1_penalty, "sparsity_warmup_steps": sparsity_warmup_steps, "layer": layer,
                    "lm_name": lm_name, "wandb_name": wandb_name, "submodule_name": submodule_name},
        )
        use_gated_optimizer(self, lr, trainer_lr_schedule(steps, warmup_steps, decay_start, None,
                                                        sparsity_warmup_steps))
        self.sparsity_warmup_fn = sparsity_schedule(sparsity_warmup_steps)
        self.layer, self.lm_name, self.submodule_name, self.wandb_name = layer, lm_name, submodule_name, wandb_name
        self.l1_penalty, self.warmup_steps, self.decay_start = l1_penalty, warmup_steps, decay_start
        self.sparsity_warmup_steps = sparsity_warmup_steps

    def update(self, step: int, x: Any) -> float:
        """One training step (upstream's `update(step, x)`): x a batch, or an (x, y) pair for transcoders."""
        return super().update(step, x)

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, y: torch.Tensor | None = None,
             **kwargs: Any):
        """The gated loss, upstream's call `loss(x, step, logging)` (transcoders pass their target as `y`;
        `loss(x, y, step)` works too). With `logging`, returns upstream's LossLog(x, x_hat, f, losses) and changes
        no training state."""
        y, step, logging = upstream_loss_call(x, step, logging, y)
        if logging:
            return self.loss_log(x, y)
        y_hat, f, gate, reconstruction, auxiliary = gated_terms(self.ae, x, y)
        sparsity = gate.sum(dim=-1).mean()  # the gate path is non-negative: its L1 norm
        loss = reconstruction + self.l1_penalty * sparsity * self.sparsity_warmup_fn(step) + auxiliary
        with torch.no_grad():
            active = f > 0
            self._track(active.any(dim=0).nonzero().flatten(), x.shape[0])
            l0 = active.sum(dim=-1).float().mean().item()
        self._record(y, y_hat.detach(), l0, loss, mse_loss=reconstruction.item(), sparsity_loss=sparsity.item(),
                     aux_loss=auxiliary.item())
        return loss

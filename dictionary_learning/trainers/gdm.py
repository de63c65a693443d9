"""GatedSAETrainer (Rajamanoharan et al. 2024, GDM): upstream's trainers.gdm, also for gated
transcoders.

Loss, with y the target (y = x for SAEs), pre the encoder projection and g = relu(pre + b_gate) the
gate path:

    L = |y - y_hat|^2 + l1_penalty * s(step) * |g|_1 + |y - (W_dec g + b_dec)|^2

summed over the output and averaged over the batch. The last (auxiliary) term decodes the gate path
through a *detached* decoder and decoder bias (and skip), so it trains only the encoder and b_gate;
the gate's step function in y_hat passes no gradient. s(step) ramps the sparsity penalty from 0 to 1
over `sparsity_warmup_steps`. Decoder columns stay at unit norm (`parts.UnitNormDecoder`), Adam
betas (0, 0.999), no gradient clipping. `GatedTrainer` is shared with `gated_anneal.py`.
"""

from __future__ import annotations

import dataclasses

import torch

from ..compat.trainer_api import UpdateX, UpstreamTrainerAPI
from ..dictionary import GatedAutoEncoder
from . import parts
from .base import PenaltyConfig, StepOutput, Trainer


def gated_terms(ae: GatedAutoEncoder, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_hat, f, gate, reconstruction loss, auxiliary loss) of a gated dictionary on a batch;
    `gate` is the gate path relu(pre + b_gate) `[batch, dict_size]`, decoded for the auxiliary loss
    through the detached decoder."""
    f, gate = ae.encode(x, return_gate=True)  # [batch, dict_size] each
    y_hat = ae.decode(f, x=x)
    y_hat_gate = gate @ ae.decoder.weight.detach().T + ae.decoder_bias.detach()
    if ae.skip is not None:
        y_hat_gate = y_hat_gate + ae.skip(x).detach()
    reconstruction = (y - y_hat).pow(2).sum(dim=-1).mean()
    auxiliary = (y - y_hat_gate).pow(2).sum(dim=-1).mean()
    return y_hat, f, gate, reconstruction, auxiliary


@dataclasses.dataclass(kw_only=True)
class GatedConfig(PenaltyConfig):
    lr: float | None = 5e-5
    l1_penalty: float = 1e-1
    wandb_name: str | None = "GatedSAETrainer"


class GatedTrainer(UpstreamTrainerAPI, Trainer):
    """The gated trainers' shared parts: the dictionary, upstream's optimizer, the gated loss with a
    penalty on the gate path (`penalty(gate, step)` -> (scaled term, metrics))."""

    default_dict_class = GatedAutoEncoder
    max_grad_norm = None  # upstream does not clip here
    unit_norm_decoder = True

    def build_optimizer(self) -> torch.optim.Optimizer:
        return parts.adam(self.ae.parameters(), self.cfg.lr, betas=(0.0, 0.999))

    def step_loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepOutput:
        y_hat, f, gate, reconstruction, auxiliary = gated_terms(self.ae, x, y)
        penalty, metrics = self.penalty(gate, step)
        out = self.output_from_codes(x, f, y_hat, reconstruction + penalty + auxiliary,
                                     {"mse_loss": reconstruction.item(),
                                      "aux_loss": auxiliary.item(), **metrics})
        return out._replace(state={**out.state, "penalised": gate})

    def penalty(self, gate: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def resampled_biases(self) -> list[torch.Tensor]:
        return [self.ae.gate_bias, self.ae.mag_bias, self.ae.r_mag]


class GatedSAETrainer(UpdateX, GatedTrainer):
    """Trains a `GatedAutoEncoder` (or a gated transcoder: `output_dim`, `transcoder`, `skip`)."""

    Config = GatedConfig
    positions = ("steps", "activation_dim", "dict_size", "layer", "lm_name", "dict_class", "lr",
                 "l1_penalty", "warmup_steps", "sparsity_warmup_steps", "decay_start", "seed",
                 "device", "wandb_name", "submodule_name")

    def penalty(self, gate: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        sparsity = gate.sum(dim=-1).mean()  # the gate path is non-negative: its L1 norm
        return (self.cfg.l1_penalty * sparsity * self.sparsity_warmup_fn(step),
                {"sparsity_loss": sparsity.item()})

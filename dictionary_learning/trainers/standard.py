"""The ReLU SAE trainers at upstream's `trainers.standard`:

- `StandardTrainer`: upstream's original recipe (Towards Monosemanticity). Decoder columns kept at
  unit norm; loss = squared error summed over the output and averaged over the batch, plus
  `l1_penalty` times the L1 norm of the codes (or, with `entropy=True`, the founding README's
  entropy of each token's normalised codes); optional dead-neuron resampling every `resample_steps`
  steps (the lr warmup then restarts). No clipping.
- `StandardTrainerAprilUpdate`: Anthropic's April 2024 update. Decoder norms are free, the L1 term
  weights each code by its decoder column norm, gradients are clipped to norm 1.

Both ramp the penalty in over `sparsity_warmup_steps` and train transcoders too (`output_dim`,
`transcoder`, `skip`; batches are then (x, y) pairs).
"""

from __future__ import annotations

import dataclasses

import torch

from ..compat.trainer_api import UpstreamTrainerAPI
from ..dictionary import AutoEncoder
from . import parts
from .base import PenaltyConfig, StepOutput, Trainer

RELU_POSITIONS = ("steps", "activation_dim", "dict_size", "layer", "lm_name", "dict_class", "lr",
                  "l1_penalty", "warmup_steps", "sparsity_warmup_steps", "decay_start")


def entropy_penalty(f: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The founding README's sparsity penalty: the entropy of each token's codes normalised to sum
    1, p = f / sum(f), H = -sum p log p (eps-smoothed; 0 for tokens with no active code), averaged
    over tokens. f: `[batch, dict_size]`."""
    total = f.sum(dim=-1, keepdim=True)  # [batch, 1]
    p = f / (total + eps)
    h = -(p * torch.log(p + eps))
    return torch.where(total > 0, h, torch.zeros_like(h)).sum(dim=-1).mean()


def resample_dead_neurons(ae: AutoEncoder, optimizer: torch.optim.Optimizer, deads: torch.Tensor,
                          x: torch.Tensor, y: torch.Tensor,
                          generator: torch.Generator | None = None) -> int:
    """Upstream's resampling (`parts.resample_rows`) of an `AutoEncoder`'s dead neurons, its encoder
    bias zeroed."""
    generator = (generator if generator is not None
                 else torch.Generator(device=x.device).manual_seed(0))
    with torch.no_grad():
        return parts.resample_rows(ae, optimizer, deads, x, y, generator, [ae.encoder.bias])


@dataclasses.dataclass(kw_only=True)
class StandardConfig(PenaltyConfig):
    l1_penalty: float = 1e-1
    resample_steps: int | None = None
    entropy: bool = False
    wandb_name: str | None = "StandardTrainer"


@dataclasses.dataclass(kw_only=True)
class AprilConfig(PenaltyConfig):
    l1_penalty: float = 1e-1
    wandb_name: str | None = "StandardTrainerAprilUpdate"


class ReLUTrainer(UpstreamTrainerAPI, Trainer):
    """The dense-code trainers of `AutoEncoder`s: the codes `f` and the reconstruction from one
    forward pass, the penalty (`penalty(f, step)` -> (scaled term, metrics)) on top of the squared
    error."""

    default_dict_class = AutoEncoder

    def step_loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepOutput:
        y_hat, f = self.ae(x, output_features=True)
        recon = (y - y_hat).pow(2).sum(dim=-1).mean()
        penalty, metrics = self.penalty(f, step)
        return self.output_from_codes(x, f, y_hat, recon + penalty,
                                      {"mse_loss": recon.item(), **metrics})

    def penalty(self, f: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


class StandardTrainer(ReLUTrainer):
    """Upstream's original StandardTrainer: trains an `AutoEncoder` (or a transcoder of that class)
    with a unit-norm decoder, an L1 (or, with `entropy`, entropy) penalty and optional dead-neuron
    resampling."""

    Config = StandardConfig
    positions = (*RELU_POSITIONS, "resample_steps", "seed", "device", "wandb_name",
                 "submodule_name")
    max_grad_norm = None  # upstream does not clip here
    unit_norm_decoder = True

    def sparsity_loss(self, f: torch.Tensor) -> torch.Tensor:
        """The penalty before its coefficient: mean L1 norm of the codes, or their mean entropy."""
        return entropy_penalty(f) if self.cfg.entropy else f.norm(p=1, dim=-1).mean()

    def penalty(self, f: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        sparsity = self.sparsity_loss(f)
        return (self.cfg.l1_penalty * self.sparsity_warmup_fn(step) * sparsity,
                {"sparsity_loss": sparsity.item()})


class StandardTrainerAprilUpdate(ReLUTrainer):
    """Upstream's StandardTrainerAprilUpdate: trains an `AutoEncoder` (or a transcoder of that
    class) with free decoder norms, the decoder-norm-weighted L1 penalty and gradient clipping at
    norm 1."""

    Config = AprilConfig
    positions = (*RELU_POSITIONS, "seed", "device", "wandb_name", "submodule_name")
    logging_parameters = ["sparsity_coefficient"]

    def setup(self) -> None:
        self.sparsity_coefficient = 0.0

    def penalty(self, f: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """l1_penalty * sum_i f_i |W_dec[:, i]|, ramped."""
        l1 = (f * self.ae.decoder.weight.norm(dim=0)).sum(dim=-1).mean()
        coefficient = self.cfg.l1_penalty * self.sparsity_warmup_fn(step)
        return coefficient * l1, {"sparsity_loss": l1.item(), "l1_loss": l1.item(),
                                  "sparsity_coefficient": coefficient}

    def after_step(self, step: int, x: torch.Tensor, y: torch.Tensor, out: StepOutput) -> None:
        super().after_step(step, x, y, out)
        self.sparsity_coefficient = out.metrics["sparsity_coefficient"]

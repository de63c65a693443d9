"""StandardTrainer: ReLU SAE with an L1 penalty, Anthropic's April 2024 update.

Loss: squared error summed over the output, averaged over the batch, plus `l1_penalty` times the L1 norm of the
codes weighted by each latent's decoder norm (decoder norms are left free). The penalty ramps up linearly over
`sparsity_warmup_steps`; gradients are clipped to norm 1.
"""

from __future__ import annotations

import torch

from ..dictionary import AutoEncoder, Dictionary
from .trainer import SAETrainer


class StandardTrainerAprilUpdate(SAETrainer):
    """Trains an `AutoEncoder` (or a transcoder of that class)."""

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type[Dictionary] = AutoEncoder,
        lr: float = 5e-5,
        l1_penalty: float = 1.0,
        warmup_steps: int = 1000,
        sparsity_warmup_steps: int | None = 2000,
        decay_start: int | None = None,
        dead_feature_threshold: int = 10_000_000,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip: bool = False,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str = "StandardTrainerAprilUpdate",
        submodule_name: str | None = None,
    ):
        super().__init__(
            seed, steps=steps, lr=lr, warmup_steps=warmup_steps, decay_start=decay_start,
            dead_feature_threshold=dead_feature_threshold, device=device,
            build_dictionary=lambda: dict_class(activation_dim, dict_size, output_dim=output_dim,
                                                transcoder=transcoder, skip=skip),
            config={"l1_penalty": l1_penalty, "sparsity_warmup_steps": sparsity_warmup_steps, "layer": layer,
                    "lm_name": lm_name, "wandb_name": wandb_name, "submodule_name": submodule_name},
        )
        self.l1_penalty, self.sparsity_warmup_steps = l1_penalty, sparsity_warmup_steps
        self.logging_parameters = ["sparsity_coefficient"]
        self.sparsity_coefficient = 0.0

    def loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        f = self.ae.encode(x)  # [batch, dict_size]
        y_hat = self.ae.decode(f, x)
        mse = (y - y_hat).pow(2).sum(dim=-1).mean()
        l1 = (f * self.ae.decoder.weight.norm(dim=0)).sum(dim=-1).mean()
        ramp = 1.0 if not self.sparsity_warmup_steps else min(1.0, (step + 1) / self.sparsity_warmup_steps)
        self.sparsity_coefficient = self.l1_penalty * ramp
        loss = mse + self.sparsity_coefficient * l1
        with torch.no_grad():
            active = f > 0
            self._track(active.any(dim=0).nonzero().flatten(), x.shape[0])
            l0 = active.sum(dim=-1).float().mean().item()
        self._record(y, y_hat.detach(), l0, loss, l1_loss=l1.item(), mse_loss=mse.item())
        return loss


class StandardTrainer(StandardTrainerAprilUpdate):
    """Stub: upstream's original StandardTrainer is being written; until then the April update."""

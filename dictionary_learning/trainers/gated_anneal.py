"""GatedAnnealTrainer: a gated SAE whose sparsity penalty is annealed from the L1 norm towards L0
(upstream's trainers.gated_anneal), also for gated transcoders.

The loss is `gdm.py`'s with the gate path's L1 norm replaced by the annealed L_p penalty of
`p_anneal.py` (`sparsity_function` "Lp^p": sum_i g_i^p, or "Lp": (sum_i g_i^p)^(1/p)), weighted by
the coefficient and the sparsity warmup ramp; p steps from `p_start` towards `p_end` and the
coefficient is rescaled at each step of p (`parts.PAnnealing`). With `resample_steps`, latents that
fired on no token for more than resample_steps / 2 steps are resampled every resample_steps steps,
and the lr warmup restarts each time.
"""

from __future__ import annotations

import dataclasses

import torch

from .gdm import GatedTrainer
from .p_anneal import AnnealConfig, Annealed


@dataclasses.dataclass(kw_only=True)
class GatedAnnealConfig(AnnealConfig):
    lr: float | None = 3e-4
    sparsity_function: str = "Lp^p"
    wandb_name: str | None = "GatedAnnealTrainer"


class GatedAnnealTrainer(Annealed, GatedTrainer):
    """Trains a `GatedAutoEncoder` (or a gated transcoder) with p-annealing of its sparsity
    penalty."""

    Config = GatedAnnealConfig
    positions = ("steps", "activation_dim", "dict_size", "layer", "lm_name", "dict_class", "lr",
                 "warmup_steps", "sparsity_warmup_steps", "decay_start", "sparsity_function",
                 "initial_sparsity_penalty", "anneal_start", "anneal_end", "p_start", "p_end",
                 "n_sparsity_updates",
                 "sparsity_queue_length",
                 "resample_steps", "device", "seed", "wandb_name")
    resample_phase = -1  # upstream resamples at step % resample_steps == resample_steps - 1

    def penalty(self, gate: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        scaled, metrics = self.annealed_penalty(gate, step)
        return scaled, {**metrics, "sparsity_loss": metrics["scaled_lp_loss"]}

"""MatryoshkaBatchTopKTrainer (Bussmann et al. 2025), at upstream's import path with its
`MatryoshkaBatchTopKSAE` and `apply_temperature`: BatchTopK training whose loss is, for each active
group g, the squared error of the prefix reconstruction from the active latents of groups 0..g,
times `group_weights[g]`, averaged over the groups (plus AuxK on the full reconstruction's
residual). Each prefix decodes only its groups' active latents.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..dictionary import MatryoshkaBatchTopKSAE, SparseCode
from .batch_top_k import BatchTopKConfig, BatchTopKTrainer, token_topk_code

__all__ = ["MatryoshkaBatchTopKSAE", "MatryoshkaBatchTopKTrainer", "MatryoshkaConfig",
           "apply_temperature", "group_sizes_from_fractions"]


def apply_temperature(probabilities: list[float], temperature: float) -> list[float]:
    """Sharpen (temperature < 1) or flatten (> 1) a probability distribution: p_i^(1/T),
    renormalised."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logits = torch.tensor(probabilities, dtype=torch.float32).log() / temperature
    return torch.softmax(logits, dim=0).tolist()


def group_sizes_from_fractions(group_fractions: Sequence[float], dict_size: int) -> list[int]:
    """Upstream's split: int(fraction * dict_size) latents for each group but the last, which takes
    the rest."""
    if not isinstance(group_fractions, Sequence) or not group_fractions:
        raise ValueError("group_fractions must be a non-empty list of fractions summing to 1, got "
                         f"{group_fractions!r}")
    if not math.isclose(sum(group_fractions), 1.0):
        raise ValueError(f"group_fractions must sum to 1.0, got {list(group_fractions)} (sum "
                         f"{sum(group_fractions)})")
    sizes = [int(fraction * dict_size) for fraction in group_fractions[:-1]]
    return sizes + [dict_size - sum(sizes)]


@dataclasses.dataclass(kw_only=True)
class MatryoshkaConfig(BatchTopKConfig):
    """`group_fractions`: the fraction of dict_size in each nested group (required); `group_weights`
    (default equal) weight each group's prefix loss."""

    group_fractions: list[float] | None = None
    group_weights: list[float] | None = None
    wandb_name: str | None = "BatchTopKSAE"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_fractions is None:
            raise ValueError("group_fractions is required: the fraction of dict_size in each "
                             "nested group, e.g. [0.25, 0.25, 0.5]")
        self.group_fractions = list(self.group_fractions)
        sizes = group_sizes_from_fractions(self.group_fractions, self.dict_size)
        if self.group_weights is None:
            self.group_weights = [1.0 / len(sizes)] * len(sizes)
        if len(self.group_weights) != len(sizes):
            raise ValueError(f"group_weights needs one weight per group ({len(sizes)}), got "
                             f"{self.group_weights}")
        self.group_weights = list(self.group_weights)

    @property
    def group_sizes(self) -> list[int]:
        return group_sizes_from_fractions(self.group_fractions, self.dict_size)


class MatryoshkaBatchTopKTrainer(BatchTopKTrainer):
    """Trains a `MatryoshkaBatchTopKSAE` (or a transcoder of that class)."""

    Config = MatryoshkaConfig
    positions = ("steps", "activation_dim", "dict_size", "k", "layer", "lm_name", "group_fractions",
                 "group_weights", "dict_class", "lr", "auxk_alpha", "warmup_steps", "decay_start",
                 "threshold_beta", "threshold_start_step", "k_anneal_steps", "seed", "device",
                 "wandb_name", "submodule_name")
    default_dict_class = MatryoshkaBatchTopKSAE

    def build_dictionary(self):
        cls = self.cfg.dict_class or self.default_dict_class
        return cls(self.cfg.activation_dim, self.cfg.dict_size, self.cfg.k, self.cfg.group_sizes,
                   **self.dictionary_arguments())

    @property
    def group_sizes(self) -> list[int]:
        return self.cfg.group_sizes

    def select(self, x: torch.Tensor, pre: torch.Tensor, step: int = 0) -> SparseCode:
        if step < self.cfg.token_topk_steps:  # each token's k largest in the active groups
            return token_topk_code(self.ae, x, pre[:, :self.ae.active_end], int(self.ae.k))
        if self.distributed is None:
            return self.ae.sparse_code(x, pre)
        # the global batch's k * batch largest codes, then the inactive groups dropped
        # (as ae.batch_topk)
        rows, cols, values = self.global_batch_topk(pre, int(self.ae.k) * x.shape[0])
        keep = cols < self.ae.active_end
        return self.ae.gather_code(x, rows[keep], cols[keep], values[keep], x.shape[0])

    def reconstruct(self, code: SparseCode, x: torch.Tensor) -> torch.Tensor:
        # one [batch, d_out] reconstruction per active group
        self._prefixes = self.ae.decode_prefixes(code, x)
        return self._prefixes[-1]

    def reconstruction_loss(self, y: torch.Tensor, code: SparseCode, x: torch.Tensor,
                            y_hat: torch.Tensor
                            ) -> tuple[torch.Tensor, dict[str, Any]]:
        prefixes, self._prefixes = self._prefixes, None
        losses = torch.stack([(y - prefix).pow(2).sum(dim=-1).mean() * weight
                              # [groups]
                              for prefix, weight in zip(prefixes, self.cfg.group_weights)])
        l2_loss = losses.mean()
        return l2_loss, {"l2_loss": l2_loss.item(), "min_l2_loss": losses.min().item(),
                         "max_l2_loss": losses.max().item()}

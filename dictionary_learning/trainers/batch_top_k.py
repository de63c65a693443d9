"""BatchTopKTrainer (Bussmann et al. 2024), at upstream's import path with its `BatchTopKSAE`: TopK
training whose codes are the batch's k * batch largest, and whose inference threshold follows the
smallest code the batch kept."""

from __future__ import annotations

import dataclasses

import torch

from ..dictionary import BatchTopKSAE, SparseCode
from . import parts
from .top_k import TopKConfig, TopKTrainer

__all__ = ["BatchTopKConfig", "BatchTopKSAE", "BatchTopKTrainer"]


@dataclasses.dataclass(kw_only=True)
class BatchTopKConfig(TopKConfig):
    wandb_name: str | None = "BatchTopKTrainer"


class BatchTopKTrainer(TopKTrainer):
    """Trains a `BatchTopKSAE`: the batch's k*batch largest codes while training (over the global
    batch in data-parallel training); the inference threshold is an exponential moving average of
    the smallest kept code."""

    Config = BatchTopKConfig
    default_dict_class = BatchTopKSAE

    def select(self, x: torch.Tensor, pre: torch.Tensor) -> SparseCode:
        if self.distributed is None:
            return self.ae.sparse_code(x, pre)
        return self.ae.gather_code(x, *self.global_batch_topk(pre, int(self.ae.k) * x.shape[0]),
                                   x.shape[0])

    @torch.no_grad()
    def global_batch_topk(self, pre: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
        """Data-parallel batch top-k: (rows, cols, values) of this rank's pre-activations
        `[batch, d_sae]` among the global batch's `n * world_size` largest positive ones (n: this
        rank's share), sorted by row and latent."""
        n_global = n * self.distributed.world_size
        candidates = self.distributed.gather_rows(pre.flatten().topk(min(n_global, pre.numel()),
                                                                     sorted=False).values)
        smallest_kept = candidates.topk(min(n_global, candidates.numel()),
                                        sorted=False).values.min()
        rows, cols = ((pre >= smallest_kept) & (pre > 0)).nonzero(as_tuple=True)
        return rows, cols, pre[rows, cols]

    def update_threshold(self, f: torch.Tensor) -> None:
        """Upstream's threshold update from the batch's codes (kept ones, or dense
        `[batch, d_sae]`)."""
        super().update_threshold(f)

    def threshold_target(self, kept: torch.Tensor, n_rows: int) -> torch.Tensor:
        return parts.batch_threshold(kept, self.global_min)

"""BatchTopKTrainer (Bussmann et al. 2024), at upstream's import path with its `BatchTopKSAE`: TopK
training whose codes are the batch's k * batch largest, and whose inference threshold follows the
smallest code the batch kept."""

from __future__ import annotations

import dataclasses

import torch

from ..checks import integer
from ..dictionary import BatchTopKSAE, Dictionary, SparseCode
from . import parts
from .top_k import TopKConfig, TopKTrainer

__all__ = ["BatchTopKConfig", "BatchTopKSAE", "BatchTopKTrainer", "token_topk_code"]


def token_topk_code(ae: Dictionary, x: torch.Tensor, pre: torch.Tensor, k: int) -> SparseCode:
    """The code of each row's k largest pre-activations `pre` `[batch, n]` (the first n latents)."""
    values, cols = pre.topk(min(k, pre.shape[1]), dim=-1, sorted=False)
    rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(cols.shape[1])
    return ae.gather_code(x, rows, cols.reshape(-1), values.reshape(-1), x.shape[0])


@dataclasses.dataclass(kw_only=True)
class BatchTopKConfig(TopKConfig):
    """`token_topk_steps`: the first this many steps keep each token's k largest codes (TopK)
    before the batch's k * batch largest. From its first step, the batch's budget goes to the few
    latents that happen to match the largest tokens; the rest die, and AuxK does not revive them
    (on planted features, 62-72% recovered where TopK finds 95-98%; with half the steps per token,
    95-98%: `bench/planted.py`). 0 (default): upstream's, batch top-k throughout."""

    token_topk_steps: int = 0
    wandb_name: str | None = "BatchTopKTrainer"

    def __post_init__(self) -> None:
        super().__post_init__()
        integer("token_topk_steps", self.token_topk_steps, 0, self.steps, high_name="steps")


class BatchTopKTrainer(TopKTrainer):
    """Trains a `BatchTopKSAE`: the batch's k*batch largest codes while training (over the global
    batch in data-parallel training); the inference threshold is an exponential moving average of
    the smallest kept code."""

    Config = BatchTopKConfig
    default_dict_class = BatchTopKSAE

    def select(self, x: torch.Tensor, pre: torch.Tensor, step: int = 0) -> SparseCode:
        if step < self.cfg.token_topk_steps:
            return token_topk_code(self.ae, x, pre, int(self.ae.k))
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

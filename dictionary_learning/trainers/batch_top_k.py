"""BatchTopKTrainer (Bussmann et al. 2024), at upstream's import path with its `BatchTopKSAE`."""

from __future__ import annotations

import torch

from ..dictionary import BatchTopKSAE, SparseCode
from .top_k import TopKTrainer


class BatchTopKTrainer(TopKTrainer):
    """Trains a `BatchTopKSAE`: the batch's k*batch largest codes while training; the inference threshold is an
    exponential moving average (beta `threshold_beta`, from `threshold_start_step`) of the smallest kept code."""

    default_dict_class = BatchTopKSAE

    def __init__(self, *args, wandb_name: str = "BatchTopKTrainer", **kwargs):
        super().__init__(*args, wandb_name=wandb_name, **kwargs)

    def _code(self, x: torch.Tensor, pre: torch.Tensor, step: int) -> SparseCode:
        if self.distributed is None:
            code = self.ae.sparse_code(x, pre)
        else:  # the global batch's k * batch largest codes
            code = self.ae.gather_code(x, *self._global_batch_topk(pre, int(self.ae.k) * x.shape[0]), x.shape[0])
        if step >= self.threshold_start_step:
            self.update_threshold(code.values.detach())
        return code

    @torch.no_grad()
    def update_threshold(self, f: torch.Tensor) -> None:
        """Upstream's inference threshold: an exponential moving average (beta `threshold_beta`) of the smallest
        positive code the batch kept (0 when none was)."""
        active = f[f > 0]
        smallest = self._global_min(active.min().float() if active.numel() else torch.full((), torch.inf,
                                                                                           device=f.device))
        self._move_threshold(smallest if torch.isfinite(smallest) else torch.zeros((), device=f.device))

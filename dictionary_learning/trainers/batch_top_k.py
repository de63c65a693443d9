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
        code = self.ae.sparse_code(x, pre)
        if step >= self.threshold_start_step and code.values.numel():
            with torch.no_grad():
                smallest = code.values[code.values > 0].min().to(self.ae.threshold.dtype)
                if self.ae.threshold < 0:
                    self.ae.threshold.copy_(smallest)
                else:
                    self.ae.threshold.mul_(self.threshold_beta).add_((1 - self.threshold_beta) * smallest)
        return code

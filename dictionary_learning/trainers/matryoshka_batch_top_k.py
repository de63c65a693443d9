"""Matryoshka BatchTopK trainer (Bussmann et al. 2025), upstream's trainers.matryoshka_batch_top_k. (Being written: a stub until then.)"""

from __future__ import annotations

from ..dictionary import MatryoshkaBatchTopKSAE  # noqa: F401 (upstream keeps it here)
from .trainer import SAETrainer


class MatryoshkaBatchTopKTrainer(SAETrainer):
    """Matryoshka BatchTopK trainer (Bussmann et al. 2025), upstream's trainers.matryoshka_batch_top_k."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("MatryoshkaBatchTopKTrainer is not written yet")

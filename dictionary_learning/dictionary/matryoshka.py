"""Matryoshka BatchTopK SAE (Bussmann et al. 2025), upstream's MatryoshkaBatchTopKSAE. (Being written: a stub until then.)"""

from __future__ import annotations

from .base import Dictionary


class MatryoshkaBatchTopKSAE(Dictionary):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025), upstream's MatryoshkaBatchTopKSAE."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("MatryoshkaBatchTopKSAE is not written yet")

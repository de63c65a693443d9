"""Gated SAE (Rajamanoharan et al. 2024, GDM), upstream's GatedAutoEncoder. (Being written: a stub until then.)"""

from __future__ import annotations

from .base import Dictionary


class GatedAutoEncoder(Dictionary):
    """Gated SAE (Rajamanoharan et al. 2024, GDM), upstream's GatedAutoEncoder."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("GatedAutoEncoder is not written yet")

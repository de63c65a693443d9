"""Gated SAE with p-annealing, upstream's trainers.gated_anneal. (Being written: a stub until then.)"""

from __future__ import annotations

from .trainer import SAETrainer


class GatedAnnealTrainer(SAETrainer):
    """Gated SAE with p-annealing, upstream's trainers.gated_anneal."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("GatedAnnealTrainer is not written yet")

"""Gated SAE trainer (GDM), upstream's trainers.gdm. (Being written: a stub until then.)"""

from __future__ import annotations

from .trainer import SAETrainer


class GatedSAETrainer(SAETrainer):
    """Gated SAE trainer (GDM), upstream's trainers.gdm."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("GatedSAETrainer is not written yet")

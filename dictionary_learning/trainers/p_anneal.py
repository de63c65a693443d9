"""ReLU SAE with an annealed L_p penalty, upstream's trainers.p_anneal. (Being written: a stub until then.)"""

from __future__ import annotations

from .trainer import SAETrainer


class PAnnealTrainer(SAETrainer):
    """ReLU SAE with an annealed L_p penalty, upstream's trainers.p_anneal."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("PAnnealTrainer is not written yet")

"""JumpReLU trainer (Rajamanoharan et al. 2024), upstream's trainers.jumprelu. (Being written: a stub until then.)"""

from __future__ import annotations

from .trainer import SAETrainer


class JumpReluTrainer(SAETrainer):
    """JumpReLU trainer (Rajamanoharan et al. 2024), upstream's trainers.jumprelu."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("JumpReluTrainer is not written yet")

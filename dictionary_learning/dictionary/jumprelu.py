"""JumpReLU SAE (Rajamanoharan et al. 2024), upstream's JumpReluAutoEncoder. (Being written: a stub until then.)"""

from __future__ import annotations

from .base import Dictionary


class JumpReluAutoEncoder(Dictionary):
    """JumpReLU SAE (Rajamanoharan et al. 2024), upstream's JumpReluAutoEncoder."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("JumpReluAutoEncoder is not written yet")

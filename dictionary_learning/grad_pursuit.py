"""Gradient pursuit: sparse non-negative codes of a batch of signals over a fixed dictionary, found
at inference time (no encoder), as described by the GDM mechanistic interpretability team's progress
update (2024).

Each of `target_l0` rounds adds the atom most aligned with the residual to a row's active set (as
matching pursuit does), takes one gradient step on the squared error restricted to the active set
with the exactly optimal step size, and clips the codes at zero. A row therefore has at most
`target_l0` non-zero codes.
"""

from __future__ import annotations

from typing import Any

import torch

# a `Dictionary` is recognised by its methods, not imported: this room sits on the dictionaries'
# floor


@torch.no_grad()
def dictionary_atoms(dictionary: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(atoms `[d_out, d_sae]`, bias `[d_out]`) of a dictionary's decoder: decode(f) =
    atoms @ f + bias. Read off the decoder itself, so any linear decoder works (a transcoder's skip
    term depends on the input and is not part of it)."""
    if getattr(dictionary, "skip", None) is not None:
        raise ValueError("this transcoder's decoder adds a skip term W_skip @ x, so it has no "
                         "fixed atoms")
    param = next(dictionary.parameters())
    zero = torch.zeros(1, dictionary.d_sae, device=param.device, dtype=param.dtype)
    bias = dictionary.decode(zero)[0]
    identity = torch.eye(dictionary.d_sae, device=param.device, dtype=param.dtype)
    return (dictionary.decode(identity) - bias).T, bias


def _pursuit_step(signal: torch.Tensor, weights: torch.Tensor, atoms: torch.Tensor,
                  selected: torch.Tensor
                  ) -> torch.Tensor:
    """One round for every row: select the best-aligned atom, step along the restricted gradient,
    clip at 0."""
    residual = signal - weights @ atoms.T  # [batch, d]
    alignment = residual @ atoms  # [batch, n]: minus the gradient of 0.5 * ||residual||^2
    selected[torch.arange(signal.shape[0], device=signal.device), alignment.argmax(dim=1)] = True
    direction = alignment * selected  # [batch, n]
    change = direction @ atoms.T  # [batch, d]: how the reconstruction moves along `direction`
    energy = change.pow(2).sum(dim=1)
    step = (change * residual).sum(dim=1) / energy.clamp_min(torch.finfo(energy.dtype).tiny)
    # a row already fitted stays where it is
    step = torch.where(energy > 0, step, torch.zeros_like(step))
    return (weights + step[:, None] * direction).clamp_min(0)


@torch.no_grad()
def grad_pursuit(signal: torch.Tensor, dictionary: Any, target_l0: int = 20,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """Non-negative codes `[batch, n]` with at most `target_l0` non-zeros per row such that codes @
    atoms.T approximates `signal` `[batch, d]`.

    dictionary: atoms as columns `[d, n]` (upstream's form), or a `Dictionary`, whose decoder atoms
    are used and whose decoder bias is subtracted from the signal first (so
    `dictionary.decode(codes)` is the approximation).
    device: where to compute (default: the signal's device); the codes are returned there, in the
    signal's dtype.
    """
    if not isinstance(signal, torch.Tensor) or signal.dim() != 2 or not signal.is_floating_point():
        raise ValueError("signal must be a floating-point tensor [batch, d], got "
                         f"{getattr(signal, 'dtype', type(signal).__name__)} "
                         f"{tuple(getattr(signal, 'shape', ()))}")
    if isinstance(target_l0, bool) or not isinstance(target_l0, int) or target_l0 <= 0:
        raise ValueError(f"target_l0 must be a positive int, got {target_l0!r}")
    device = signal.device if device is None else torch.device(device)
    signal = signal.to(device)
    if isinstance(dictionary, torch.nn.Module) and hasattr(dictionary, "decode"):
        atoms, bias = dictionary_atoms(dictionary)
        signal = signal - bias.to(device, signal.dtype)
    elif isinstance(dictionary, torch.Tensor) and dictionary.dim() == 2:
        atoms = dictionary
    else:
        raise TypeError("dictionary must be a [d, n] tensor of atoms or a Dictionary, got "
                        f"{type(dictionary).__name__}")
    if atoms.shape[0] != signal.shape[1]:
        raise ValueError(f"atoms have width {atoms.shape[0]} (shape [d, n] = "
                         f"{tuple(atoms.shape)}), the signal {signal.shape[1]}")
    atoms = atoms.to(device, signal.dtype)
    weights = torch.zeros(signal.shape[0], atoms.shape[1], device=device, dtype=signal.dtype)
    selected = torch.zeros_like(weights, dtype=torch.bool)
    for _ in range(target_l0):
        weights = _pursuit_step(signal, weights, atoms, selected)
    return weights

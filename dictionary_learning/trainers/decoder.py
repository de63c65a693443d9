"""The decoder's geometry, shared by every method that keeps decoder directions at unit norm:
the directions as rows whichever way a dictionary stores them, the gradient along each projected
out before the optimizer step, the directions renormalised after it."""

from __future__ import annotations

import torch

from ..dictionary import Dictionary


def decoder_directions(ae: Dictionary) -> torch.Tensor:
    """The decoder directions as the rows of a `[d_sae, d_out]` view of the parameter itself,
    whichever way the dictionary stores it (TopK dictionaries store nn.Linear's `[d_out, d_sae]`
    weight as a transposed view of row-major storage, so these rows are contiguous)."""
    return ae.W_dec if hasattr(ae, "W_dec") else ae.decoder.weight.t()


def view_grad(view: torch.Tensor, create: bool = False) -> torch.Tensor | None:
    """The gradient of the parameter that `view` is (or is the transpose of), seen the same way;
    with `create`, a zero one where the parameter has none yet."""
    parameter = view if view._base is None else view._base
    if parameter.grad is None:
        if not create:
            return None
        parameter.grad = torch.zeros_like(parameter)
    return parameter.grad if parameter is view else parameter.grad.t()


@torch.no_grad()
def project_out_parallel_gradient(rows: torch.Tensor, grad: torch.Tensor) -> None:
    """Remove from each row of `grad` its component along the matching row of `rows` (both
    `[d_sae, d_out]`), in place: one norm, one batched dot and one fused update, all along rows."""
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True).add_(1e-6)
    dots = torch.einsum("ij,ij->i", grad, rows)[:, None]
    grad.addcmul_(rows, dots / norms.square(), value=-1)


@torch.no_grad()
def unit_norm_rows(rows: torch.Tensor) -> None:
    """Scale each row to unit norm, in place."""
    rows /= torch.linalg.vector_norm(rows, dim=1, keepdim=True) + torch.finfo(rows.dtype).eps


class UnitNormDecoder:
    """Keep a dictionary's decoder directions at unit norm: the gradient along each direction
    removed before the optimizer step, the directions renormalised after it (Gao et al.; upstream's
    TopK, JumpReLU and Matryoshka)."""

    def __init__(self, ae: Dictionary):
        self.ae = ae

    def before_step(self) -> None:
        rows = decoder_directions(self.ae)
        grad = view_grad(rows)
        if grad is not None:
            project_out_parallel_gradient(rows, grad)

    def after_step(self) -> None:
        unit_norm_rows(decoder_directions(self.ae))


def decoder_rows(ae: Dictionary, ids: torch.Tensor) -> torch.Tensor:
    """`[len(ids), d_out]`: the decoder directions of latents `ids`."""
    return decoder_directions(ae)[ids]

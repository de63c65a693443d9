"""Sparse kernels of the TopK training path: a sparse code (`SparseCode`), `gather_linear` (a linear
map evaluated only at chosen (row, latent) pairs, whose backward costs O(active * d_in) instead of a
dense GEMM) and `sparse_decode` (`F.embedding_bag` over the active decoder rows, with a sparse-dense
product as the table's gradient). Each is an autograd function with a hand-written backward, tested
against float64 autograd and `torch.autograd.gradcheck`. `bench/bench_topk.py` measures them against
the dense path.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


class _GatherLinear(torch.autograd.Function):
    """values[n] = (x[rows[n]] - center) . weight[cols[n]] + bias[cols[n]] (center None: x itself),
    given the values already computed densely.

    Backward without dense [batch, d_sae] work: grad_bias by index_add, grad_weight as a
    sparse-dense product over the centred x with one non-zero per (row, col) pair, grad_center as
    -grad_bias @ weight (one vector-matrix product, never a dense [d_sae, d_in] outer product),
    grad_x as a sparse-dense product over the chosen weight rows.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, center, rows, cols, values):
        ctx.save_for_backward(x, weight, center, rows, cols)
        ctx.has_bias, ctx.has_center = bias is not None, center is not None
        return values

    @staticmethod
    def backward(ctx, grad_values):
        x, weight, center, rows, cols = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = grad_center = None
        grad_values = grad_values.to(x.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = sparse_transpose_matmul(rows, cols, grad_values, weight, x.shape[0])
        if ctx.needs_input_grad[1]:
            centred = x - center if ctx.has_center else x
            grad_weight = sparse_transpose_matmul(cols, rows, grad_values, centred, weight.shape[0])
        if (ctx.has_bias and ctx.needs_input_grad[2]) or (ctx.has_center
                                                          and ctx.needs_input_grad[3]):
            summed = torch.zeros(weight.shape[0], dtype=grad_values.dtype,
                                 device=grad_values.device).index_add_(0, cols, grad_values)
            grad_bias = summed if ctx.has_bias and ctx.needs_input_grad[2] else None
            if ctx.has_center and ctx.needs_input_grad[3]:
                grad_center = -(summed @ weight)
        return grad_x, grad_weight, grad_bias, grad_center, None, None, None


def sparse_transpose_matmul(out_rows: torch.Tensor, in_rows: torch.Tensor, values: torch.Tensor,
                            x: torch.Tensor, n_out: int) -> torch.Tensor:
    """S @ x for a sparse S[n_out, len(x)] with S[out_rows[i], in_rows[i]] = values[i] (duplicates
    add up), written once into a fresh output (torch.sparse.mm would zero-fill two)."""
    out = torch.empty(n_out, x.shape[1], dtype=x.dtype, device=x.device)
    if values.numel() == 0:
        return out.zero_()
    sparse = torch.sparse_coo_tensor(torch.stack([out_rows, in_rows]), values, (n_out, x.shape[0]),
                                     check_invariants=False)
    return torch.addmm(out, sparse, x, beta=0, out=out)


def fast_matmul_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where the hardware multiplies it fast (GPUs; CPUs with AVX-512 BF16 or AMX), else
    float32 (on other CPUs bfloat16 is emulated and slower than float32)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    cpu = getattr(torch, "cpu", None)
    fast = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                "_is_amx_tile_supported"))
    return torch.bfloat16 if fast else torch.float32


@torch.no_grad()
def sampled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`(x @ weight.T + bias)[rows, cols]`, `[n]`, in x's dtype, without the dense product: a
    sampled dense-dense product over the (row, col) pairs (`torch.sparse.sampled_addmm`, work n *
    d_in)."""
    n_rows, n_cols = x.shape[0], weight.shape[0]
    order = (rows * n_cols + cols).argsort()  # CSR: rows ascending, columns ascending within a row
    counts = torch.bincount(rows, minlength=n_rows)
    row_starts = torch.zeros(n_rows + 1, dtype=torch.long, device=x.device)
    row_starts[1:] = counts.cumsum(0)
    values = torch.empty(len(cols), dtype=x.dtype, device=x.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(row_starts, cols[order], torch.zeros_like(values),
                                          size=(n_rows, n_cols), check_invariants=False)
        values[order] = torch.sparse.sampled_addmm(pattern, x, weight.t()).values()
    return values + bias[cols].to(x.dtype) if bias is not None else values


@torch.no_grad()
def dense_pre_activations(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          center: torch.Tensor | None, dtype: torch.dtype | None = None
                          ) -> torch.Tensor:
    """`(x - center) @ weight.T + bias` `[batch, d_sae]` (center None: x), without autograd; with
    `dtype` the GEMM runs in it (bfloat16 to choose latents fast)."""
    centred = x if center is None else x - center
    if dtype is not None and dtype != x.dtype:
        return F.linear(centred.to(dtype), weight.to(dtype), bias.to(dtype))
    return F.linear(centred, weight, bias)


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor | None = None,
                  center: torch.Tensor | None = None) -> torch.Tensor:
    """`((x - center) @ weight.T + bias)[rows, cols]` (center None: x) with a sparse backward. Pass
    `values` if already computed (no grad); values of a lower precision than x (a bfloat16 encoder
    GEMM's) are recomputed exactly in x's dtype."""
    if values is not None and values.dtype != x.dtype:
        values = sampled_linear(x if center is None else x - center.detach(), weight, bias, rows,
                                cols)
    if values is None:
        with torch.no_grad():
            centred = x if center is None else x - center
            values = (centred[rows] * weight[cols]).sum(-1) + (bias[cols] if bias is not None
                                                               else 0)
    return _GatherLinear.apply(x, weight, bias, center, rows, cols, values.detach())


class _KnownLinear(torch.autograd.Function):
    """(x - center) @ weight.T + bias, `[batch, n]`, given its values already computed (a block of
    a larger product's columns): backward one GEMM for weight's gradient, sums and one
    vector-matrix product for bias and center, and x's only when x needs one."""

    @staticmethod
    def forward(ctx, x, weight, bias, center, values):
        ctx.save_for_backward(x, weight, center)
        return values

    @staticmethod
    def backward(ctx, grad):
        x, weight, center = ctx.saved_tensors
        grad = grad.to(x.dtype)
        summed = grad.sum(0)
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_center = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t() @ (x if center is None else x - center)
        if center is not None and ctx.needs_input_grad[3]:
            grad_center = -(summed @ weight)
        return grad_x, grad_weight, summed if ctx.needs_input_grad[2] else None, grad_center, None


def known_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 center: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """`(x - center) @ weight.T + bias` (center None: x), whose `values` were already computed
    without grad in x's dtype (e.g. as columns of the dense encoder GEMM): differentiable in every
    input without repeating the product."""
    return _KnownLinear.apply(x, weight, bias, center, values.detach())


def largest(values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices ascending, values) of the n largest entries of a 1-d tensor, as `topk` finds them
    but faster on large inputs: a strided sample gives a threshold that about 1.25 n entries exceed,
    and only those candidates go through topk (exact whenever at least n entries exceed it;
    otherwise a lower threshold, finally a plain topk)."""
    numel = values.numel()
    sample = values[::max(1, numel // 65536)]
    for margin in (1.25, 2.0, 4.0):
        m = int(sample.numel() * n / max(numel, 1) * margin) + 64
        if m >= sample.numel():
            break
        threshold = sample.topk(m, sorted=False).values.min()
        candidates = (values > threshold).nonzero().flatten()  # ascending
        if candidates.numel() >= n:
            top, local = values[candidates].topk(n, sorted=False)
            local, order = local.sort()
            return candidates[local], top[order]
    top, indices = values.topk(n, sorted=False)
    indices, order = indices.sort()
    return indices, top[order]


class SparseCode(NamedTuple):
    """A sparse code: `values[i]` of latent `cols[i]` in row `rows[i]`, grouped by row
    (rows ascending)."""

    values: torch.Tensor  # [n_active]
    rows: torch.Tensor  # [n_active]
    cols: torch.Tensor  # [n_active]
    n_rows: int

    @property
    def offsets(self) -> torch.Tensor:
        """[n_rows]: where each row's entries start."""
        counts = torch.bincount(self.rows, minlength=self.n_rows)
        return torch.cumsum(counts, 0) - counts

    def to_dense(self, d_sae: int) -> torch.Tensor:
        dense = torch.zeros(self.n_rows, d_sae, dtype=self.values.dtype,
                            device=self.values.device)
        return dense.index_put_((self.rows, self.cols), self.values, accumulate=True)


class _SparseDecode(torch.autograd.Function):
    """out[r] = sum_i values[i] * table[cols[i]] over row r's entries (embedding_bag), with a sparse
    backward: grad_table as a sparse-dense product (autograd's embedding_bag weight backward is ~4x
    slower on CPU)."""

    @staticmethod
    def forward(ctx, values, table, rows, cols, offsets):
        ctx.save_for_backward(values, table, rows, cols, offsets)
        return F.embedding_bag(cols, table, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out):
        values, table, rows, cols, offsets = ctx.saved_tensors
        grad_values = grad_table = None
        if ctx.needs_input_grad[0]:
            # embedding_bag's own per-sample-weight backward is the fast path
            with torch.enable_grad():
                weights = values.detach().requires_grad_()
                out = F.embedding_bag(cols, table.detach(), offsets, mode="sum",
                                      per_sample_weights=weights)
                (grad_values,) = torch.autograd.grad(out, weights, grad_out)
        if ctx.needs_input_grad[1]:
            grad_table = sparse_transpose_matmul(cols, rows, values, grad_out, table.shape[0])
        return grad_values, grad_table, None, None, None


def sparse_decode(code: SparseCode, decoder_weight: torch.Tensor) -> torch.Tensor:
    """W_dec @ f for a sparse code f, without the bias: `[n_rows, d_out]`. decoder_weight:
    [d_out, d_sae]."""
    if code.cols.numel() == 0:
        return torch.zeros(code.n_rows, decoder_weight.shape[0], dtype=decoder_weight.dtype,
                           device=decoder_weight.device)
    # [d_sae, d_out]: embedding_bag is ~10x slower on a transposed view
    table = decoder_weight.t().contiguous()
    return _SparseDecode.apply(code.values.to(table.dtype), table, code.rows, code.cols,
                               code.offsets)

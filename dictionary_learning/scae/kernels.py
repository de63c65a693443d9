"""The SCAE wing's hand-written autograd functions: `GatherDot` (virtual weights: a dot product per
(feature, connection) pair, computed in blocks of rows) and `connect` / `CSRProduct` (the pruned
pass: every feature's sum over its connected source codes as one sparse CSR product). Each
backward is tested against plain autograd.
"""

from __future__ import annotations

import warnings

import torch


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] through index_select on the flattened index (several times faster than advanced
    indexing)."""
    return table.index_select(0, index.flatten()).view(*index.shape, *table.shape[1:])


class GatherDot(torch.autograd.Function):
    """out[f, c, h] = A[f, h] . B[index[f, c]] (B `[J, d]`, shared by the heads) or A[f, h] .
    B[index[f, c], h] (B `[J, heads, d]`), for A `[F, heads, d]`, in blocks of rows so the gathered
    `[rows, C, ...]` blocks stay small. A custom backward writes each block's gradient into one
    preallocated tensor: autograd through sliced blocks would zero-fill a full-size gradient per
    block (measured: a third of a fine-tuning step)."""

    CHUNK = 256

    @staticmethod
    def forward(ctx, A, B, index):
        ctx.save_for_backward(A, B, index)
        pattern = "fhd,fcd->fch" if B.dim() == 2 else "fhd,fchd->fch"
        out = A.new_empty(index.shape[0], index.shape[1], A.shape[1])
        for start in range(0, len(index), GatherDot.CHUNK):
            rows = slice(start, start + GatherDot.CHUNK)
            out[rows] = torch.einsum(pattern, A[rows], gather_rows(B, index[rows]))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        A, B, index = ctx.saved_tensors
        grad_A = torch.empty_like(A) if ctx.needs_input_grad[0] else None
        grad_B = torch.zeros_like(B) if ctx.needs_input_grad[1] else None
        shared = B.dim() == 2
        for start in range(0, len(index), GatherDot.CHUNK):
            rows = slice(start, start + GatherDot.CHUNK)
            if grad_A is not None:
                grad_A[rows] = torch.einsum("fch,fcd->fhd" if shared else "fch,fchd->fhd",
                                            grad_out[rows], gather_rows(B, index[rows]))
            if grad_B is not None:
                block = torch.einsum("fch,fhd->fcd" if shared else "fch,fhd->fchd", grad_out[rows],
                                     A[rows])
                grad_B.index_add_(0, index[rows].flatten(), block.flatten(0, 1))
        return grad_A, grad_B, None


def connect(sources: list[torch.Tensor], indices: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
    """out[t, F] = sum_c weights[F, c] * x[t, indices[F, c]], where x is the concatenation of the
    `sources` code tensors `[tokens, n_module]` along features (never built). `weights`
    `[d_sae, C]` or `[d_sae, C, heads]` gives out `[tokens, d_sae]` or `[tokens,
    d_sae, heads]`. Computed as a sparse [d_sae, columns] connection matrix (d_sae x
    C non-zeros) times the dense codes of the source features that are both connected and active
    somewhere in the batch: work tokens x d_sae x C, memory tokens x those columns; no d_sae
    x n_sources matrix. Differentiable in the source codes and the weights."""
    n_features, C = indices.shape
    device = sources[0].device  # every tensor made here lives where the codes do
    indices = indices.to(device)
    connected = torch.zeros(sum(x.shape[1] for x in sources), dtype=torch.bool, device=device)
    connected[indices.flatten()] = True
    columns, lookup_parts, n_columns, offset = [], [], 0, 0
    for x in sources:
        used = ((x.detach() != 0).any(dim=0)
                & connected[offset : offset + x.shape[1]]).nonzero().flatten()
        lookup = torch.full((x.shape[1],), -1, dtype=torch.long, device=device)
        lookup[used] = torch.arange(n_columns, n_columns + len(used), device=device)
        columns.append(x.index_select(1, used))
        lookup_parts.append(lookup)
        n_columns += len(used)
        offset += x.shape[1]
    # [d_sae, C]: column of each connection, -1 where inactive
    lookup = torch.cat(lookup_parts)[indices]
    # connections to source features inactive in the batch contribute nothing: left out
    kept = lookup >= 0
    if n_columns == 0:
        return weights.new_zeros(sources[0].shape[0], n_features, *weights.shape[2:])
    # [columns, tokens] (contiguous: ~4x faster products)
    codes = torch.cat(columns, dim=1).t().contiguous()
    row_starts = torch.cat([kept.new_zeros(1, dtype=torch.long), kept.sum(dim=1).cumsum(0)])
    values = weights[kept]  # [non-zeros] or [non-zeros, heads], row by row
    out = CSRProduct.apply(values.reshape(len(values), -1), codes, row_starts, lookup[kept],
                           n_features)
    return out[..., 0] if weights.dim() == 2 else out


class CSRProduct(torch.autograd.Function):
    """out[t, F, h] = sum over the row F of a CSR matrix of values[i, h] * codes[column[i], t], one
    CSR product per head. Autograd's own backward for the CSR values took ~4.5x the forward's time
    here (dense matrix products in its profile); here the values' gradient is gathered per non-zero
    (work non-zeros x tokens) and the codes' gradient is a product with the transposed CSR
    matrix."""

    @staticmethod
    # [nnz, heads], [n_columns, tokens]
    def forward(ctx, values, codes, row_starts, columns, n_rows):
        ctx.save_for_backward(values, codes, row_starts, columns)
        ctx.n_rows = n_rows
        # "sparse CSR support is in beta": its products are ~1.7x faster than COO
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            heads = [torch.sparse_csr_tensor(row_starts, columns, values[:, h],
                                             (n_rows, codes.shape[0]),
                                             check_invariants=False) @ codes
                     for h in range(values.shape[1])]
        return torch.stack(heads, dim=-1).transpose(0, 1)  # [tokens, rows, heads]

    @staticmethod
    def backward(ctx, grad_out):
        values, codes, row_starts, columns = ctx.saved_tensors
        grad_rows = grad_out.permute(1, 2, 0).contiguous()  # [rows, heads, tokens]
        rows = torch.repeat_interleave(torch.arange(ctx.n_rows, device=row_starts.device),
                                       row_starts.diff())
        grad_values = grad_codes = None
        if ctx.needs_input_grad[0]:
            chunk = max(1, (1 << 24) // max(1, grad_rows.shape[1] * grad_rows.shape[2]))
            grad_values = (torch.cat([torch.einsum("nht,nt->nh",
                                                   gather_rows(grad_rows, rows[i : i + chunk]),
                                                   gather_rows(codes, columns[i : i + chunk]))
                                      for i in range(0, len(rows), chunk)])
                           if len(rows) else torch.zeros_like(values))
        if ctx.needs_input_grad[1]:  # the transposed matrix, as a CSR over columns
            order = columns.argsort(stable=True)
            starts = torch.cat([columns.new_zeros(1),
                                torch.bincount(columns, minlength=len(codes)).cumsum(0)])
            grad_codes = torch.zeros_like(codes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                for h in range(values.shape[1]):
                    transposed = torch.sparse_csr_tensor(starts, rows[order], values[order, h],
                                                         (len(codes), ctx.n_rows),
                                                         check_invariants=False)
                    grad_codes += transposed @ grad_rows[:, h]
        return grad_values, grad_codes, None, None, None


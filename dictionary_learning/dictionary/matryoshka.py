"""Matryoshka BatchTopK SAE (Bussmann et al. 2025): a BatchTopK SAE whose latents form nested
groups. Training asks every prefix of groups to reconstruct the input on its own, so the first
groups learn general features and later ones refine them. Upstream's parameters and `ae.pt` keys:
`W_enc` [activation_dim, dict_size], `b_enc`, `W_dec` [dict_size, output_dim], `b_dec`; buffers `k`,
`threshold` (-1 until the trainer learns one) and `group_sizes`.

The training path never builds a dense `[batch, dict_size]` code: `sparse_code` picks the batch's
k*batch largest pre-activations (`largest`, a sampled-threshold topk) and gathers them
differentiably (`gather_linear`); `decode_prefixes` decodes each group's active latents against that
group's rows of W_dec (`sparse_decode`) and adds them up group by group into the nested
reconstructions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import integer
from ..sparse import (
    SparseCode,
    dense_pre_activations,
    gather_linear,
    largest,
    sparse_decode,
)
from .base import Dictionary, load_state_dict


def _group_sizes(group_sizes: Any, dict_size: int) -> list[int]:
    """Validated group sizes: positive ints summing to dict_size."""
    if isinstance(group_sizes, torch.Tensor):
        group_sizes = group_sizes.tolist()
    if not isinstance(group_sizes, Sequence) or not group_sizes:
        raise ValueError("group_sizes must be a non-empty list of positive ints, got "
                         f"{group_sizes!r}")
    sizes = list(group_sizes)
    if any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
        raise ValueError(f"group_sizes must all be positive ints, got {sizes}")
    if sum(sizes) != dict_size:
        raise ValueError(f"group_sizes must sum to dict_size={dict_size}, got {sizes} (sum "
                         f"{sum(sizes)})")
    return sizes


class MatryoshkaBatchTopKSAE(Dictionary):
    """f = BatchTopK(relu(W_enc.T (x - b_dec) + b_enc)) over the active groups; x_hat = W_dec.T f +
    b_dec.

    Inference keeps the codes above `threshold`. While no threshold has been learned (-1), every
    positive code passes, as upstream; `batch_topk_fallback=True` (an attribute, settable any time)
    uses the batch top-k instead, as this toolkit's `BatchTopKSAE` does. `active_groups`
    (default: all) limits the codes to the first groups.
    """

    def __init__(self, activation_dim: int, dict_size: int, k: int, group_sizes: list[int],
                 output_dim: int | None = None, transcoder: bool = False, skip: bool = False, *,
                 batch_topk_fallback: bool = False):
        super().__init__()
        activation_dim, dict_size = self._init_shared(activation_dim, dict_size, output_dim,
                                                      transcoder, skip)
        sizes = _group_sizes(group_sizes, dict_size)
        k = integer("k", k)
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.register_buffer("group_sizes", torch.tensor(sizes))
        self.active_groups = len(sizes)
        self.batch_topk_fallback = batch_topk_fallback

        # upstream's [activation_dim, dict_size] as a transposed view of row-major storage: each
        # latent's encoder row is contiguous for the sparse training path
        self.W_enc = nn.Parameter(torch.empty(dict_size, activation_dim).t())
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        w = nn.init.kaiming_uniform_(torch.empty(dict_size, self.output_dim))
        self.W_dec = nn.Parameter(w / (w.norm(dim=1, keepdim=True) + torch.finfo(w.dtype).eps))
        self.b_dec = nn.Parameter(torch.zeros(self.output_dim))
        if self.output_dim == activation_dim:  # tied initialisation
            self.W_enc.data = self.W_dec.data.t().clone()
        else:
            # [dict_size, activation_dim]: fan-in activation_dim
            nn.init.kaiming_uniform_(self.W_enc.data.t())

    @property
    def group_indices(self) -> list[int]:
        """Group boundaries: group g holds latents group_indices[g] to group_indices[g + 1] - 1."""
        return [0, *torch.cumsum(self.group_sizes, 0).tolist()]

    @property
    def active_end(self) -> int:
        """One past the last latent of the active groups."""
        return self.group_indices[self.active_groups]

    # dense inference ------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, return_active: bool = False, use_threshold: bool = True):
        """Codes `[..., dict_size]` above `threshold` (use_threshold) or of the batch top-k (k *
        tokens largest); with return_active also (which latents fired in the batch, post-relu
        pre-activations)."""
        post_relu = F.relu(self._encoder_input(x) @ self.W_enc + self.b_enc)
        if use_threshold and not (self.batch_topk_fallback and self.threshold < 0):
            codes = post_relu * (post_relu > self.threshold)
        else:
            flat = post_relu.flatten()
            indices, values = largest(flat, min(int(self.k) * (flat.numel() // self.dict_size),
                                                flat.numel()))
            codes = torch.zeros_like(flat).scatter_(-1, indices, values).reshape(post_relu.shape)
        end = self.active_end
        if end < self.dict_size:
            codes[..., end:] = 0
        if return_active:
            return codes, codes.reshape(-1, self.dict_size).sum(0) > 0, post_relu
        return codes

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction `[..., output_dim]` from codes `f` (x: the input, needed by skip
        transcoders)."""
        return self._add_skip(f @ self.W_dec + self.b_dec, x)

    # sparse training path -------------------------------------------------------------------------
    def _encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(W `[dict_size, activation_dim]`, b, c) with pre-activations (x - c) @ W.T + b for raw
        inputs x (c: b_dec for SAEs, None for transcoders)."""
        return self.W_enc.t(), self.b_enc, None if self.transcoder else self.b_dec

    def pre_activations(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense encoder pre-activations `[batch, dict_size]` (before the relu), without autograd;
        with `dtype` (e.g. bfloat16) the GEMM runs in it (to choose latents; `gather_code`
        recomputes the chosen values exactly)."""
        return dense_pre_activations(x, *self._encoder_affine(), dtype)

    def batch_topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the batch's k*batch largest positive pre-activations in the
        active groups, sorted by row and, within a row, by latent."""
        flat, values = largest(pre.flatten(), min(int(self.k) * pre.shape[0], pre.numel()))
        keep = values > 0
        flat, values = flat[keep], values[keep]
        rows, cols = flat // self.dict_size, flat % self.dict_size
        end = self.active_end
        # selected among all latents, then the inactive groups are dropped (as upstream)
        if end < self.dict_size:
            keep = cols < end
            rows, cols, values = rows[keep], cols[keep], values[keep]
        return rows, cols, values

    def gather_code(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    values: torch.Tensor, n_rows: int) -> SparseCode:
        """The differentiable code relu(pre-activation) at (rows, cols), given the pre-activations
        `values`."""
        weight, bias, center = self._encoder_affine()
        # (W_enc is stored as a transposed view of row-major storage: these rows are contiguous)
        return SparseCode(gather_linear(x, weight, bias, rows, cols, values, center).relu(), rows,
                          cols, n_rows)

    def sparse_code(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> SparseCode:
        """The differentiable batch-top-k code of `x` [batch, activation_dim] (pass `pre` if already
        computed)."""
        pre = self.pre_activations(x) if pre is None else pre
        rows, cols, values = self.batch_topk(pre)
        return self.gather_code(x, rows, cols, values, x.shape[0])

    def decode_sparse(self, code: SparseCode, x: torch.Tensor | None = None,
                      bias: bool = True) -> torch.Tensor:
        """Reconstruction `[batch, output_dim]` from a sparse code (`bias=False`: W_dec.T f alone,
        as for AuxK)."""
        out = sparse_decode(code, self.W_dec.t())
        return self._add_skip(out + self.b_dec, x) if bias else out

    def decode_prefixes(self, code: SparseCode,
                        x: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The nested reconstructions, one `[batch, output_dim]` per active group g, each decoding
        only the active latents of groups 0..g. `code` must be grouped by row (as `sparse_code`
        returns it)."""
        starts = self.group_indices[:self.active_groups + 1]
        boundaries = torch.tensor(starts[1:-1], device=code.cols.device)
        # [n_active]: each latent's group
        groups = torch.bucketize(code.cols, boundaries, right=True)
        counts = torch.bincount(groups, minlength=self.active_groups).tolist()
        order = groups.sort(stable=True).indices  # by group, rows still ascending within each group
        parts = zip(code.values[order].split(counts), code.rows[order].split(counts),
                    code.cols[order].split(counts))
        prefix = self._add_skip(self.b_dec.expand(code.n_rows, self.output_dim), x)
        prefixes = []
        for g, (values, rows, cols) in enumerate(parts):
            start, end = starts[g], starts[g + 1]
            group_code = SparseCode(values, rows, cols - start, code.n_rows)
            # group g's rows of W_dec only
            prefix = prefix + sparse_decode(group_code, self.W_dec[start:end].t())
            prefixes.append(prefix)
        return prefixes

    # scale, config, loading -----------------------------------------------------------------------
    def _input_scaled(self) -> list[torch.Tensor]:
        return [self.b_enc, *self._learned_threshold()]

    def _decoder_weight(self) -> torch.Tensor:
        return self.W_dec

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Upstream's: multiply biases and threshold by `scale` (a dictionary trained on x / scale
        then works on x)."""
        self.fold_scale(1 / scale, 1 / scale)

    def dictionary_config(self) -> dict[str, Any]:
        return {**super().dictionary_config(), "k": int(self.k),
                "group_sizes": self.group_sizes.tolist()}

    @classmethod
    def _saved_widths(cls, state_dict: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        # W_enc [activation_dim, dict_size]
        return (*state_dict["W_enc"].shape, state_dict["W_dec"].shape[1])

    @classmethod
    def _extra_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"k": int(state_dict["k"]), "group_sizes": state_dict["group_sizes"].tolist()}

    @classmethod
    def from_pretrained(cls, path: str | Path, k: int | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        **kwargs) -> MatryoshkaBatchTopKSAE:
        """Upstream's `from_pretrained(path, k=None, device=None)` (an `ae.pt` / `.safetensors` file
        or a folder): `k` defaults to the saved one and must equal it when both are given."""
        state_dict = load_state_dict(path)
        if k is not None and int(k) != int(state_dict["k"]):
            raise ValueError(f"k={k} was asked for, but {str(path)!r} holds a dictionary with "
                             f"k={int(state_dict['k'])}")
        return cls.from_saved_state(state_dict, **kwargs).to(device=device, dtype=dtype)

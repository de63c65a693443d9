"""TopK dictionaries: `AutoEncoderTopK` (Gao et al. 2024) and `BatchTopKSAE` (Bussmann et al. 2024),
each also a transcoder. Their training path never builds a dense `[batch, dict_size]` code:
`sparse_code` gathers the k active pre-activations through `gather_linear` and `decode_sparse`
decodes them with `sparse_decode` (both in `sparse.py`, with hand-written backward passes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import integer
from ..sparse import SparseCode, dense_pre_activations, gather_linear, largest, sparse_decode
from .base import Dictionary, load_state_dict

# --------------------------------------------------------------------------------------------------
# TopK


def topk_codes(codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes with all but the k largest of each row zeroed, those k values, their indices) for
    non-negative codes `[..., dict_size]`."""
    values, indices = codes.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(codes).scatter_(-1, indices, values), values, indices


class TopKDictionary(Dictionary):
    """Shared parts of TopK-style dictionaries: unit-norm decoder columns, `k` and `threshold`
    buffers, b_dec, and the sparse training path."""

    def __init__(self, activation_dim: int, dict_size: int, k: int, output_dim: int | None = None,
                 transcoder: bool = False, skip: bool = False):
        super().__init__()
        activation_dim, dict_size = self._init_shared(activation_dim, dict_size, output_dim,
                                                      transcoder, skip)
        k = integer("k", k, 1, dict_size, high_name="dict_size")
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.decoder = nn.Linear(dict_size, self.output_dim, bias=False)
        w = torch.randn(self.output_dim, dict_size)
        # nn.Linear's [d_out, d_sae] weight (upstream's layout in state dicts and files) as a
        # transposed view of row-major storage: each latent's direction is contiguous, so the sparse
        # decode, its gradient and the unit-norm constraint read rows, never strided columns
        w = (w / w.norm(dim=0, keepdim=True)).t().contiguous().t()
        self.decoder.weight = nn.Parameter(w)
        self.encoder = nn.Linear(activation_dim, dict_size)
        nn.init.zeros_(self.encoder.bias)
        if self.output_dim == activation_dim:
            self.encoder.weight.data = self.decoder.weight.data.t().clone()
        else:
            nn.init.kaiming_uniform_(self.encoder.weight)
        self.b_dec = nn.Parameter(torch.zeros(self.output_dim))

    @classmethod
    def from_pretrained(cls, path: str | Path, k: int | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        **kwargs):
        """Upstream's `from_pretrained(path, k=None, device=None)`: `k` defaults to the saved one
        and must equal it when both are given."""
        state_dict = load_state_dict(path)
        if k is not None and "k" in state_dict and int(k) != int(state_dict["k"]):
            raise ValueError(f"k={k} was asked for, but {str(path)!r} holds a dictionary with "
                             f"k={int(state_dict['k'])}")
        if k is not None and "k" not in state_dict:
            state_dict["k"] = torch.tensor(int(k), dtype=torch.int)
        return cls.from_saved_state(state_dict, **kwargs).to(device=device, dtype=dtype)

    @classmethod
    def _extra_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"k": int(state_dict["k"])}

    def dictionary_config(self) -> dict[str, Any]:
        return {**super().dictionary_config(), "k": int(self.k)}

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self._add_skip(self.decoder(f) + self.b_dec, x)

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply the biases (and a learned threshold) by `scale`: afterwards `new(scale * x) ==
        scale * old(x)`."""
        self.encoder.bias.data *= scale
        self.b_dec.data *= scale
        if self.threshold >= 0:
            self.threshold *= scale

    def _encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(W `[d_sae, d_in]`, b, c) with pre-activations = (x - c) @ W.T + b for raw inputs x; c is
        b_dec for SAEs, None for transcoders (which read x itself)."""
        return self.encoder.weight, self.encoder.bias, None if self.transcoder else self.b_dec

    def pre_activations(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense encoder pre-activations, without autograd: `[batch, dict_size]`; with `dtype`
        (e.g. bfloat16) the GEMM runs in it (to choose latents; `gather_code` recomputes the chosen
        values exactly)."""
        return dense_pre_activations(x, *self._encoder_affine(), dtype)

    def gather_code(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    values: torch.Tensor, n_rows: int) -> SparseCode:
        """The differentiable sparse code with pre-activations `values` (no grad) at
        (rows, cols)."""
        weight, bias, center = self._encoder_affine()
        return SparseCode(gather_linear(x, weight, bias, rows, cols, values, center).relu(), rows,
                          cols, n_rows)

    def decode_sparse(self, code: SparseCode, x: torch.Tensor | None = None,
                      bias: bool = True) -> torch.Tensor:
        """Reconstruction from a sparse code (`bias=False`: W_dec f alone, as for AuxK)."""
        out = sparse_decode(code, self.decoder.weight)
        return self._add_skip(out + self.b_dec, x) if bias else out


class AutoEncoderTopK(TopKDictionary):
    """TopK SAE (Gao et al. 2024): f = TopK_k(relu(W_enc (x - b_dec) + b_enc)); x_hat = W_dec f +
    b_dec."""

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-activations, latent indices) of each row's k largest codes, no grad: `[batch, k]`
        each.

        The codes are the pre-activations' relu (a pre-activation can be negative when fewer than k
        are positive).
        """
        return self.pre_activations(x).topk(int(self.k), dim=-1, sorted=False)

    def encode(self, x: torch.Tensor, return_topk: bool = False, use_threshold: bool = False):
        """Dense codes `[batch, dict_size]`; with return_topk also (top values, top indices,
        post-relu codes)."""
        pre = F.relu(self.encoder(self._encoder_input(x)))
        if use_threshold:
            if self.threshold < 0:  # it would keep every positive code
                raise ValueError("encode(use_threshold=True) needs a learned threshold, but this "
                                 f"dictionary's is {float(self.threshold)} (never learned): use "
                                 "the TopK code (use_threshold=False)")
            codes = pre * (pre > self.threshold)
            return (codes, *codes.topk(int(self.k), dim=-1), pre) if return_topk else codes
        codes, values, indices = topk_codes(pre, int(self.k))
        return (codes, values, indices, pre) if return_topk else codes

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """Reconstruction through the sparse path (no dense code) unless features are asked for."""
        self.check_input(x)
        if output_features:
            return super().forward(x, output_features=True)
        flat = x.reshape(-1, x.shape[-1])
        return self.decode_sparse(self.sparse_code(flat), flat).reshape(*x.shape[:-1],
                                                                        self.output_dim)

    def sparse_code(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> SparseCode:
        """The differentiable TopK code of `x` [batch, activation_dim] (pass `pre` if already
        computed)."""
        pre = self.pre_activations(x) if pre is None else pre
        top_values, top_indices = pre.topk(int(self.k), dim=-1, sorted=False)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(top_indices.shape[1])
        return self.gather_code(x, rows, top_indices.reshape(-1), top_values.reshape(-1),
                                x.shape[0])


class BatchTopKSAE(TopKDictionary):
    """BatchTopK SAE (Bussmann et al. 2024): while training, the batch's `k * batch` largest codes
    are kept; at inference, codes above a learned `threshold` (tracked by the trainer).

    While no threshold has been learned (-1), inference keeps every positive code, as upstream;
    `batch_topk_fallback=True` (an attribute, settable any time) uses the batch top-k instead.
    """

    def __init__(self, activation_dim: int, dict_size: int, k: int, output_dim: int | None = None,
                 transcoder: bool = False, skip: bool = False, *,
                 batch_topk_fallback: bool = False):
        super().__init__(activation_dim, dict_size, k, output_dim=output_dim, transcoder=transcoder,
                         skip=skip)
        self.batch_topk_fallback = batch_topk_fallback

    def batch_topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the batch's k*batch largest positive pre-activations, grouped by
        row."""
        flat, values = largest(pre.flatten(), min(int(self.k) * pre.shape[0], pre.numel()))
        keep = values > 0  # (flat ascending: grouped by row)
        flat, values = flat[keep], values[keep]
        return flat // self.dict_size, flat % self.dict_size, values

    def encode(self, x: torch.Tensor, return_active: bool = False, use_threshold: bool = True):
        """Dense codes: above `threshold` (use_threshold, inference) or the batch top-k (training;
        also at inference before a threshold is learned when `batch_topk_fallback`)."""
        pre = F.relu(self.encoder(self._encoder_input(x)))
        if use_threshold and not (self.batch_topk_fallback and self.threshold < 0):
            codes = pre * (pre > self.threshold)
        else:  # training-time selection
            flat = pre.flatten()
            n = min(int(self.k) * x.shape[0], flat.numel())
            values, indices = flat.topk(n, sorted=False)
            codes = torch.zeros_like(flat).scatter_(-1, indices, values).reshape(pre.shape)
        return (codes, codes.sum(0) > 0, pre) if return_active else codes

    def sparse_code(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> SparseCode:
        """The differentiable batch-top-k code of `x` [batch, activation_dim]
        (training-time selection)."""
        pre = self.pre_activations(x) if pre is None else pre
        rows, cols, values = self.batch_topk(pre)
        return self.gather_code(x, rows, cols, values, x.shape[0])

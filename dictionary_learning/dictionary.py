"""Dictionaries: ReLU `AutoEncoder`, `AutoEncoderTopK` and `BatchTopKSAE`, each usable as a transcoder.

Parameter names and `ae.pt` state dicts follow upstream dictionary_learning (`encoder`, `decoder`, `bias` / `b_dec`,
buffers `k` and `threshold`), so upstream checkpoints load here and ours load there. A transcoder maps an input of
width `activation_dim` to an output of width `output_dim` (default: the same): its encoder reads the raw input
(no `b_dec` is subtracted, since that bias lives in output space) and an optional linear skip adds `W_skip @ x`.

TopK dictionaries never build a dense `[batch, dict_size]` code in their training path: `topk_forward` gathers the
k active pre-activations through `gather_linear` (a linear map evaluated only at chosen (row, latent) pairs, whose
backward costs O(active * d_in) instead of a dense GEMM) and decodes with `sparse_decode` (`F.embedding_bag` over the
active decoder rows). `bench/bench_topk.py` measures both against the dense path.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------------
# sparse kernels


class _GatherLinear(torch.autograd.Function):
    """values[n] = x[rows[n]] . weight[cols[n]] + bias[cols[n]], given the values already computed densely.

    Backward without dense [batch, d_sae] work: grad_bias by index_add, grad_weight as a sparse-dense product
    with one non-zero per (row, col) pair, grad_x by embedding_bag over the chosen weight rows.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rows, cols, values):
        ctx.save_for_backward(x, weight, rows, cols)
        ctx.has_bias = bias is not None
        return values

    @staticmethod
    def backward(ctx, grad_values):
        x, weight, rows, cols = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        grad_values = grad_values.to(x.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x).index_add_(0, rows, weight[cols] * grad_values[:, None]) if rows.numel() \
                else torch.zeros_like(x)
        if ctx.needs_input_grad[1]:
            grad_weight = sparse_transpose_matmul(cols, rows, grad_values, x, weight.shape[0])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=grad_values.dtype, device=grad_values.device)
            grad_bias.index_add_(0, cols, grad_values)
        return grad_x, grad_weight, grad_bias, None, None, None


def sparse_transpose_matmul(out_rows: torch.Tensor, in_rows: torch.Tensor, values: torch.Tensor,
                            x: torch.Tensor, n_out: int) -> torch.Tensor:
    """S @ x for a sparse S[n_out, len(x)] with S[out_rows[i], in_rows[i]] = values[i] (duplicates add up)."""
    if values.numel() == 0:
        return torch.zeros(n_out, x.shape[1], dtype=x.dtype, device=x.device)
    sparse = torch.sparse_coo_tensor(torch.stack([out_rows, in_rows]), values, (n_out, x.shape[0]),
                                     check_invariants=False)
    return torch.sparse.mm(sparse, x)


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
                  cols: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """`(x @ weight.T + bias)[rows, cols]` with a sparse backward. Pass `values` if already computed (no grad)."""
    if values is None:
        with torch.no_grad():
            values = (x[rows] * weight[cols]).sum(-1) + (bias[cols] if bias is not None else 0)
    return _GatherLinear.apply(x, weight, bias, rows, cols, values.detach())


class SparseCode(NamedTuple):
    """A sparse code: `values[i]` of latent `cols[i]` in row `rows[i]`, grouped by row (rows ascending)."""

    values: torch.Tensor  # [n_active]
    rows: torch.Tensor  # [n_active]
    cols: torch.Tensor  # [n_active]
    n_rows: int

    @property
    def offsets(self) -> torch.Tensor:
        """[n_rows]: where each row's entries start."""
        counts = torch.bincount(self.rows, minlength=self.n_rows)
        return torch.cumsum(counts, 0) - counts

    def to_dense(self, dict_size: int) -> torch.Tensor:
        dense = torch.zeros(self.n_rows, dict_size, dtype=self.values.dtype, device=self.values.device)
        return dense.index_put_((self.rows, self.cols), self.values, accumulate=True)


class _SparseDecode(torch.autograd.Function):
    """out[r] = sum_i values[i] * table[cols[i]] over row r's entries (embedding_bag), with a sparse backward:
    grad_table as a sparse-dense product (autograd's embedding_bag weight backward is ~4x slower on CPU)."""

    @staticmethod
    def forward(ctx, values, table, rows, cols, offsets):
        ctx.save_for_backward(values, table, rows, cols, offsets)
        return F.embedding_bag(cols, table, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out):
        values, table, rows, cols, offsets = ctx.saved_tensors
        grad_values = grad_table = None
        if ctx.needs_input_grad[0]:
            with torch.enable_grad():  # embedding_bag's own per-sample-weight backward is the fast path
                weights = values.detach().requires_grad_()
                out = F.embedding_bag(cols, table.detach(), offsets, mode="sum", per_sample_weights=weights)
                (grad_values,) = torch.autograd.grad(out, weights, grad_out)
        if ctx.needs_input_grad[1]:
            grad_table = sparse_transpose_matmul(cols, rows, values, grad_out, table.shape[0])
        return grad_values, grad_table, None, None, None


def sparse_decode(code: SparseCode, decoder_weight: torch.Tensor) -> torch.Tensor:
    """W_dec @ f for a sparse code f, without the bias: `[n_rows, d_out]`. decoder_weight: [d_out, d_sae]."""
    if code.cols.numel() == 0:
        return torch.zeros(code.n_rows, decoder_weight.shape[0], dtype=decoder_weight.dtype,
                           device=decoder_weight.device)
    table = decoder_weight.t().contiguous()  # [d_sae, d_out]: embedding_bag is ~10x slower on a transposed view
    return _SparseDecode.apply(code.values.to(table.dtype), table, code.rows, code.cols, code.offsets)


# ----------------------------------------------------------------------------------------------------------------
# base


class Dictionary(ABC, nn.Module):
    """A dictionary: `encode` input -> features, `decode` features -> output, `forward` both."""

    activation_dim: int
    dict_size: int
    output_dim: int
    transcoder: bool

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [batch, activation_dim] -> [batch, dict_size]
        ...

    @abstractmethod
    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:  # -> [batch, output_dim]
        ...

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """Reconstruction (and features if output_features)."""
        self.check_input(x)
        f = self.encode(x)
        x_hat = self.decode(f, x)
        return (x_hat, f) if output_features else x_hat

    # shared pieces --------------------------------------------------------------------------------------------
    def _init_shared(self, activation_dim: int, dict_size: int, output_dim: int | None, transcoder: bool,
                     skip: bool) -> None:
        for name, value in (("activation_dim", activation_dim), ("dict_size", dict_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        output_dim = activation_dim if output_dim is None else output_dim
        if not isinstance(output_dim, int) or output_dim <= 0:
            raise ValueError(f"output_dim must be a positive int, got {output_dim!r}")
        self.activation_dim, self.dict_size, self.output_dim = activation_dim, dict_size, output_dim
        self.transcoder = bool(transcoder or skip or output_dim != activation_dim)
        self.skip = nn.Linear(activation_dim, output_dim, bias=False) if skip else None
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)

    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for inputs of the wrong width / dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of shape [..., {self.activation_dim}], got {type(x).__name__}")
        if x.shape[-1] != self.activation_dim:
            raise ValueError(f"expected input width {self.activation_dim}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point tensor, got {x.dtype}")

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.transcoder else x - self.decoder_bias

    def _add_skip(self, out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if self.skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip connection: decode(f, x) needs the input x")
            out = out + self.skip(x)
        return out

    @property
    def decoder_bias(self) -> torch.Tensor:
        return self.b_dec

    @torch.no_grad()
    def fold_scale(self, scale_in: float, scale_out: float) -> None:
        """Make a dictionary trained on (scale_in * x, scale_out * y) work on raw (x, y): afterwards
        `new(x) == old(scale_in * x) / scale_out`, and features are `1 / scale_in` times the old ones."""
        self.encoder.bias /= scale_in
        if hasattr(self, "threshold") and self.threshold >= 0:
            self.threshold /= scale_in
        self.decoder.weight *= scale_in / scale_out
        decoder_bias = self.decoder_bias
        decoder_bias /= scale_out
        if self.skip is not None:
            self.skip.weight *= scale_in / scale_out

    def dictionary_config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild the dictionary (saved in config.json)."""
        config = {"dict_class": type(self).__name__, "activation_dim": self.activation_dim,
                  "dict_size": self.dict_size}
        if self.transcoder:
            config.update(output_dim=self.output_dim, transcoder=True, skip=self.skip is not None)
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None,
                        **kwargs):
        """Load from an `ae.pt` / `.safetensors` state dict, or a folder holding one (shapes read from the weights)."""
        state_dict = load_state_dict(path)
        dictionary = cls.from_state_dict(state_dict, **kwargs)
        dictionary.load_state_dict(state_dict)
        return dictionary.to(device=device, dtype=dtype)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], **kwargs) -> "Dictionary":
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        output_dim = state_dict["decoder.weight"].shape[0]
        skip = "skip.weight" in state_dict
        transcoder = kwargs.pop("transcoder", None)
        if transcoder is None:
            transcoder = skip or output_dim != activation_dim
        return cls(activation_dim=activation_dim, dict_size=dict_size, output_dim=output_dim,
                   transcoder=transcoder, skip=skip, **cls._extra_from_state_dict(state_dict), **kwargs)

    @classmethod
    def _extra_from_state_dict(cls, state_dict):
        return {}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A dictionary's state dict from `ae.pt`, a `.safetensors` file, or a folder holding either."""
    path = Path(path)
    if path.is_dir():
        for name in ("ae.pt", "model.safetensors", "ae.safetensors"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise ValueError(f"folder {str(path)!r} holds no ae.pt or model.safetensors")
    if not path.exists():
        raise ValueError(f"no such file: {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------------
# ReLU autoencoder (April 2024 update: decoder-norm-weighted L1, unconstrained decoder norms)


class AutoEncoder(Dictionary):
    """ReLU SAE: f = relu(W_enc (x - b_dec) + b_enc); x_hat = W_dec f + b_dec. Upstream names: `bias` is b_dec."""

    def __init__(self, activation_dim: int, dict_size: int, output_dim: int | None = None,
                 transcoder: bool = False, skip: bool = False):
        super().__init__()
        self._init_shared(activation_dim, dict_size, output_dim, transcoder, skip)
        self.bias = nn.Parameter(torch.zeros(self.output_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, self.output_dim, bias=False)
        # Anthropic's April 2024 init: decoder columns random directions of norm 0.1, encoder = decoder transpose
        w = torch.randn(self.output_dim, dict_size)
        w = 0.1 * w / w.norm(dim=0, keepdim=True)
        self.decoder.weight.data = w
        nn.init.zeros_(self.encoder.bias)
        if self.output_dim == activation_dim:
            self.encoder.weight.data = w.t().clone()
        else:
            nn.init.kaiming_uniform_(self.encoder.weight)

    @property
    def decoder_bias(self) -> torch.Tensor:
        return self.bias

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.encoder(self._encoder_input(x)))

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self._add_skip(self.decoder(f) + self.bias, x)


# ----------------------------------------------------------------------------------------------------------------
# TopK


class TopKDictionary(Dictionary):
    """Shared parts of TopK-style dictionaries: unit-norm decoder columns, `k` and `threshold` buffers, b_dec, and
    the sparse training path."""

    def __init__(self, activation_dim: int, dict_size: int, k: int, output_dim: int | None = None,
                 transcoder: bool = False, skip: bool = False):
        super().__init__()
        self._init_shared(activation_dim, dict_size, output_dim, transcoder, skip)
        if not isinstance(k, int) or not 0 < k <= dict_size:
            raise ValueError(f"k must be an int in [1, dict_size={dict_size}], got {k!r}")
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.decoder = nn.Linear(dict_size, self.output_dim, bias=False)
        w = torch.randn(self.output_dim, dict_size)
        self.decoder.weight.data = w / w.norm(dim=0, keepdim=True)
        self.encoder = nn.Linear(activation_dim, dict_size)
        nn.init.zeros_(self.encoder.bias)
        if self.output_dim == activation_dim:
            self.encoder.weight.data = self.decoder.weight.data.t().clone()
        else:
            nn.init.kaiming_uniform_(self.encoder.weight)
        self.b_dec = nn.Parameter(torch.zeros(self.output_dim))

    @classmethod
    def _extra_from_state_dict(cls, state_dict):
        return {"k": int(state_dict["k"])}

    def dictionary_config(self) -> dict[str, Any]:
        return {**super().dictionary_config(), "k": int(self.k)}

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self._add_skip(self.decoder(f) + self.b_dec, x)

    def _encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with pre-activations = x @ W.T + b for raw inputs x. For SAEs b = b_enc - W_enc @ b_dec, so
        gradients reach b_dec through one [d_sae, d_in] x [d_in] product instead of a per-token one."""
        weight, bias = self.encoder.weight, self.encoder.bias
        if not self.transcoder:
            bias = bias - weight @ self.b_dec
        return weight, bias

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Dense encoder pre-activations, without autograd: `[batch, dict_size]`."""
        with torch.no_grad():
            return F.linear(x, *self._encoder_affine())

    def gather_code(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                    n_rows: int) -> SparseCode:
        """The differentiable sparse code with pre-activations `values` (no grad) at (rows, cols)."""
        weight, bias = self._encoder_affine()
        return SparseCode(gather_linear(x, weight, bias, rows, cols, values).relu(), rows, cols, n_rows)

    def decode_sparse(self, code: SparseCode, x: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        """Reconstruction from a sparse code (`bias=False`: W_dec f alone, as for AuxK)."""
        out = sparse_decode(code, self.decoder.weight)
        return self._add_skip(out + self.b_dec, x) if bias else out


class AutoEncoderTopK(TopKDictionary):
    """TopK SAE (Gao et al. 2024): f = TopK_k(relu(W_enc (x - b_dec) + b_enc)); x_hat = W_dec f + b_dec."""

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-activations, latent indices) of each row's k largest codes, no grad: `[batch, k]` each.

        The codes are the pre-activations' relu (a pre-activation can be negative when fewer than k are positive).
        """
        return self.pre_activations(x).topk(int(self.k), dim=-1, sorted=False)

    def encode(self, x: torch.Tensor, return_topk: bool = False, use_threshold: bool = False):
        """Dense codes `[batch, dict_size]`; with return_topk also (top values, top indices, post-relu codes)."""
        pre = F.relu(self.encoder(self._encoder_input(x)))
        if use_threshold:
            codes = pre * (pre > self.threshold)
            return (codes, *codes.topk(int(self.k), dim=-1), pre) if return_topk else codes
        values, indices = pre.topk(int(self.k), dim=-1, sorted=False)
        codes = torch.zeros_like(pre).scatter_(-1, indices, values)
        return (codes, values, indices, pre) if return_topk else codes

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """Reconstruction through the sparse path (no dense code) unless features are asked for."""
        self.check_input(x)
        if output_features:
            return super().forward(x, output_features=True)
        flat = x.reshape(-1, x.shape[-1])
        return self.decode_sparse(self.sparse_code(flat), flat).reshape(*x.shape[:-1], self.output_dim)

    def sparse_code(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> SparseCode:
        """The differentiable TopK code of `x` [batch, activation_dim] (pass `pre` if already computed)."""
        pre = self.pre_activations(x) if pre is None else pre
        top_values, top_indices = pre.topk(int(self.k), dim=-1, sorted=False)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(top_indices.shape[1])
        return self.gather_code(x, rows, top_indices.reshape(-1), top_values.reshape(-1), x.shape[0])


class BatchTopKSAE(TopKDictionary):
    """BatchTopK SAE (Bussmann et al. 2024): while training, the batch's `k * batch` largest codes are kept;
    at inference, codes above a learned `threshold` (tracked by the trainer)."""

    def batch_topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the batch's k*batch largest positive pre-activations, grouped by row."""
        n = min(int(self.k) * pre.shape[0], pre.numel())
        values, flat = pre.flatten().topk(n, sorted=False)
        keep = values > 0
        flat, values = flat[keep], values[keep]
        flat, order = flat.sort()
        return flat // self.dict_size, flat % self.dict_size, values[order]

    def encode(self, x: torch.Tensor, return_active: bool = False, use_threshold: bool = True):
        """Dense codes: above `threshold` (use_threshold, inference) or the batch top-k (training, or before any
        threshold was learned)."""
        pre = F.relu(self.encoder(self._encoder_input(x)))
        if use_threshold and self.threshold >= 0:
            codes = pre * (pre > self.threshold)
        else:  # training-time selection (also when no threshold has been learned yet)
            flat = pre.flatten()
            n = min(int(self.k) * x.shape[0], flat.numel())
            values, indices = flat.topk(n, sorted=False)
            codes = torch.zeros_like(flat).scatter_(-1, indices, values).reshape(pre.shape)
        return (codes, codes.sum(0) > 0, pre) if return_active else codes

    def sparse_code(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> SparseCode:
        """The differentiable batch-top-k code of `x` [batch, activation_dim] (training-time selection)."""
        pre = self.pre_activations(x) if pre is None else pre
        rows, cols, values = self.batch_topk(pre)
        return self.gather_code(x, rows, cols, values, x.shape[0])


DICTIONARY_CLASSES: dict[str, type[Dictionary]] = {
    cls.__name__: cls for cls in (AutoEncoder, AutoEncoderTopK, BatchTopKSAE)
}


def dictionary_from_config(config: dict[str, Any]) -> Dictionary:
    """Build an (untrained) dictionary from `dictionary_config()` output or an upstream trainer config."""
    name = config.get("dict_class")
    if name not in DICTIONARY_CLASSES:
        raise ValueError(f"unknown dict_class {name!r}; known: {sorted(DICTIONARY_CLASSES)}")
    keys = ("activation_dim", "dict_size", "k", "output_dim", "transcoder", "skip")
    kwargs = {key: config[key] for key in keys if key in config}
    if name == "AutoEncoder":
        kwargs.pop("k", None)
    return DICTIONARY_CLASSES[name](**kwargs)


def json_safe(config: dict[str, Any]) -> dict[str, Any]:
    """A config with classes and dtypes turned into names, ready for json.dumps."""
    def convert(value):
        if isinstance(value, type):
            return value.__name__
        if isinstance(value, (torch.dtype, torch.device)):
            return str(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    result = convert(config)
    json.dumps(result)
    return result

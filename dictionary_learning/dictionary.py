"""Dictionaries: ReLU `AutoEncoder`, `AutoEncoderTopK` and `BatchTopKSAE`, each usable as a transcoder.

Parameter names and `ae.pt` state dicts follow upstream dictionary_learning (`encoder`, `decoder`, `bias` / `b_dec`,
buffers `k` and `threshold`), so upstream checkpoints load here and ours load there. A transcoder maps an input of
width `activation_dim` to an output of width `output_dim` (default: the same): its encoder reads the raw input
(no `b_dec` is subtracted, since that bias lives in output space) and an optional linear skip adds `W_skip @ x`.

TopK dictionaries never build a dense `[batch, dict_size]` code in their training path: `sparse_code` gathers the
k active pre-activations through `gather_linear` and `decode_sparse` decodes them with `sparse_decode` (both in
`sparse.py`, with hand-written backward passes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .sparse import SparseCode, gather_linear, sparse_decode

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


def topk_codes(codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes with all but the k largest of each row zeroed, those k values, their indices) for non-negative codes
    `[..., dict_size]`."""
    values, indices = codes.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(codes).scatter_(-1, indices, values), values, indices


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
        codes, values, indices = topk_codes(pre, int(self.k))
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


def dictionary_class(name: Any, source: str = "") -> type[Dictionary]:
    """A dictionary class by its name (as config files and trainer configs give it; `source` names where from)."""
    if name not in DICTIONARY_CLASSES:
        raise ValueError(f"unknown dict_class {name!r}{' in ' + source if source else ''}; this toolkit has "
                         f"{sorted(DICTIONARY_CLASSES)}")
    return DICTIONARY_CLASSES[name]


def dictionary_from_config(config: dict[str, Any]) -> Dictionary:
    """Build an (untrained) dictionary from `dictionary_config()` output or an upstream trainer config."""
    cls = dictionary_class(config.get("dict_class"))
    keys = ("activation_dim", "dict_size", "output_dim", "transcoder", "skip")
    kwargs = {key: config[key] for key in keys if key in config}
    if issubclass(cls, TopKDictionary) and "k" in config:
        kwargs["k"] = config["k"]
    return cls(**kwargs)

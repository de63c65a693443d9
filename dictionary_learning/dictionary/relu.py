"""ReLU dictionaries: `AutoEncoder` (upstream's, also a transcoder), `AutoEncoderNew` (upstream's
April 2024 variant with a decoder bias and no input centring) and `IdentityDict` (the identity map
as a dictionary)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Dictionary, load_state_dict

# --------------------------------------------------------------------------------------------------
# ReLU autoencoder


def _tied_init(encoder: nn.Linear, decoder: nn.Linear, activation_dim: int) -> None:
    """Anthropic's April 2024 init: decoder columns are random directions of norm 0.1, the encoder
    is the decoder's transpose (a random encoder when output and input widths differ), the encoder
    bias is 0."""
    output_dim, dict_size = decoder.weight.shape
    w = torch.randn(output_dim, dict_size)
    w = 0.1 * w / w.norm(dim=0, keepdim=True)
    decoder.weight.data = w
    nn.init.zeros_(encoder.bias)
    if output_dim == activation_dim:
        encoder.weight.data = w.t().clone()
    else:
        nn.init.kaiming_uniform_(encoder.weight)


class AutoEncoder(Dictionary):
    """ReLU SAE: f = relu(W_enc (x - b_dec) + b_enc); x_hat = W_dec f + b_dec. Upstream names:
    `bias` is b_dec.

    Trained by `StandardTrainer` (unit-norm decoder columns) or `StandardTrainerAprilUpdate` (free
    decoder norms).
    """

    def __init__(self, activation_dim: int, dict_size: int, output_dim: int | None = None,
                 transcoder: bool = False, skip: bool = False):
        super().__init__()
        activation_dim, dict_size = self._init_shared(activation_dim, dict_size, output_dim,
                                                      transcoder, skip)
        self.bias = nn.Parameter(torch.zeros(self.output_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, self.output_dim, bias=False)
        _tied_init(self.encoder, self.decoder, activation_dim)

    @property
    def decoder_bias(self) -> torch.Tensor:
        return self.bias

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.encoder(self._encoder_input(x)))

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self._add_skip(self.decoder(f) + self.bias, x)

    def forward(self, x: torch.Tensor, output_features: bool = False,
                ghost_mask: torch.Tensor | None = None):
        """x_hat (and f if output_features). With a `ghost_mask` [..., dict_size] (upstream's
        ghost grads), also x_ghost = W_dec (exp(pre-activations) * ghost_mask), without bias:
        returns (x_hat, x_ghost[, f])."""
        if ghost_mask is None:
            return super().forward(x, output_features=output_features)
        self.check_input(x)
        pre = self.encoder(self._encoder_input(x))  # [..., dict_size]
        x_ghost = self.decoder(torch.exp(pre) * ghost_mask.to(pre))
        f = F.relu(pre)
        x_hat = self.decode(f, x)
        return (x_hat, x_ghost, f) if output_features else (x_hat, x_ghost)

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply both biases by `scale`: afterwards `new(scale * x) == scale * old(x)`."""
        self.encoder.bias.data *= scale
        self.bias.data *= scale

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Give every decoder column unit norm, moving its norm into the encoder row and bias, so
        that the output is unchanged and each feature is scaled by its column's old norm (no-op when
        the norms are already ~1; columns of norm 0 are left as they are)."""
        norms = self.decoder.weight.norm(dim=0)  # [dict_size]
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        if torch.allclose(norms, torch.ones_like(norms)):
            return
        self.decoder.weight.data /= norms
        self.encoder.weight.data *= norms[:, None]
        self.encoder.bias.data *= norms

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device | None = None, normalize_decoder: bool = True,
                        **kwargs) -> AutoEncoder:
        """Load an `ae.pt` / `.safetensors` state dict (or a folder holding one), upstream's
        signature. As upstream, decoder columns are renormalised unless `normalize_decoder=False`
        (outputs stay the same; features change scale for SAEs trained with free decoder norms).
        `kwargs` (e.g. `transcoder`) go to `from_saved_state`."""
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError("AutoEncoder.from_pretrained(path, dtype=torch.float32, device=None, "
                            f"...) (upstream's order): got {dtype!r} where the dtype goes; pass a "
                            f"device as device={dtype!r}")
        autoencoder = cls.from_saved_state(load_state_dict(path), **kwargs)
        if normalize_decoder:
            autoencoder.normalize_decoder()
        return autoencoder.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# AutoEncoderNew: upstream's April 2024 variant


class AutoEncoderNew(Dictionary):
    """ReLU SAE with the decoder bias inside the decoder and no input centring: f = relu(W_enc
    x + b_enc); x_hat = W_dec f + b_dec. State dict keys: encoder.{weight,bias},
    decoder.{weight,bias}. With output_features, `forward` returns the features times their decoder
    column norms (as upstream)."""

    one_scale_sae = False  # no input centring: any pair of scales folds exactly

    def __init__(self, activation_dim: int, dict_size: int, output_dim: int | None = None,
                 transcoder: bool = False, skip: bool = False):
        super().__init__()
        activation_dim, dict_size = self._init_shared(activation_dim, dict_size, output_dim,
                                                      transcoder, skip)
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, self.output_dim, bias=True)
        _tied_init(self.encoder, self.decoder, activation_dim)
        nn.init.zeros_(self.decoder.bias)

    @property
    def decoder_bias(self) -> torch.Tensor:
        return self.decoder.bias

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.encoder(x))

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self._add_skip(self.decoder(f), x)

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """x_hat, and with output_features (x_hat, f * decoder column norms)."""
        x_hat, f = super().forward(x, output_features=True)
        return (x_hat, f * self.decoder.weight.norm(dim=0)) if output_features else x_hat

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply both biases by `scale`: afterwards `new(scale * x) == scale * old(x)`."""
        self.encoder.bias.data *= scale
        self.decoder.bias.data *= scale


# --------------------------------------------------------------------------------------------------
# IdentityDict


class IdentityDict(Dictionary):
    """The identity as a dictionary (features = activations), optionally casting to `dtype` / moving
    to `device`; a baseline that has no parameters and saves an empty state dict."""

    def __init__(self, activation_dim: int | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None):
        super().__init__()
        if activation_dim is not None and (not isinstance(activation_dim, int)
                                           or activation_dim <= 0):
            raise ValueError("activation_dim must be a positive int or None, got "
                             f"{activation_dim!r}")
        self.activation_dim = self.dict_size = self.output_dim = activation_dim
        self.transcoder, self.skip = False, None
        self.dtype, self.device = dtype, device

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_dim is not None:
            self.check_input(x)
        return x.to(device=self.device, dtype=self.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._cast(x)

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return f.to(device=self.device, dtype=self.dtype)

    def forward(self, x: torch.Tensor, output_features: bool = False,
                ghost_mask: torch.Tensor | None = None):
        x = self._cast(x)
        return (x, x) if output_features else x

    def scale_biases(self, scale: float) -> None:
        """No biases: nothing to do."""

    @torch.no_grad()
    def fold_scale(self, scale_in: float, scale_out: float) -> None:
        if scale_in != scale_out:
            raise ValueError("an IdentityDict cannot fold different input and output scales "
                             f"({scale_in}, {scale_out})")

    def dictionary_config(self) -> dict:
        return {"dict_class": "IdentityDict", "activation_dim": self.activation_dim,
                "dict_size": self.dict_size}

    @classmethod
    def from_pretrained(cls, activation_dim: int | None = None, path: str | Path | None = None,
                        dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> IdentityDict:
        """Upstream's signature: nothing is read from `path` (there are no weights). PyPI 0.1.0's
        form, `from_pretrained(path, dtype, device)`, works too and, as there, casts nothing."""
        if isinstance(activation_dim, (str, Path)):  # 0.1.0: the path came first
            return cls(None)
        return cls(activation_dim, dtype=dtype, device=device)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], **kwargs) -> IdentityDict:
        return cls(kwargs.get("activation_dim"))

"""ReLU dictionaries: `AutoEncoder` (upstream's, also a transcoder), `AutoEncoderNew`, `IdentityDict`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Dictionary

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


class AutoEncoderNew(Dictionary):
    """Upstream's AutoEncoderNew (stub until written)."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("AutoEncoderNew is not written yet")


class IdentityDict(Dictionary):
    """Upstream's IdentityDict (stub until written)."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("IdentityDict is not written yet")

"""Gated SAE (Rajamanoharan et al. 2024, GDM): upstream's `GatedAutoEncoder`, also a transcoder.

A gate decides which latents fire and a magnitude path decides how strongly; both read one encoder
projection, the magnitude path rescaled per latent by exp(r_mag):

    pre   = W_enc (x - b_dec)                              (transcoders: W_enc x)
    f     = 1[pre + b_gate > 0] * relu(exp(r_mag) * pre + b_mag)
    x_hat = W_dec f + b_dec (+ W_skip x)

The gate's step function passes no gradient; training reaches the gate through the gate path's own
terms (`relu(pre + b_gate)`, see `trainers/gdm.py`). Parameter names and the `ae.pt` keys are
upstream's: `decoder_bias` (b_dec), `encoder` (no bias), `r_mag`, `gate_bias`, `mag_bias`,
`decoder`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Dictionary


class GatedAutoEncoder(Dictionary):
    """Gated SAE: separate gate and magnitude paths over one shared encoder projection."""

    def __init__(self, activation_dim: int, dict_size: int,
                 initialization: str | Callable[[GatedAutoEncoder], None] = "default",
                 device: str | torch.device | None = None, output_dim: int | None = None,
                 transcoder: bool = False, skip: bool = False):
        """`initialization`: "default" (unit-norm random decoder columns, encoder = decoder
        transpose, zero biases) or a function called with the new dictionary to set its
        parameters."""
        super().__init__()
        if initialization != "default" and not callable(initialization):
            raise ValueError("initialization must be 'default' or a function of the dictionary, "
                             f"got {initialization!r}")
        activation_dim, dict_size = self._init_shared(activation_dim, dict_size, output_dim,
                                                      transcoder, skip)
        # created in upstream's order, so that one seed gives upstream's initial weights
        self.decoder_bias = nn.Parameter(torch.empty(self.output_dim, device=device))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=False, device=device)
        self.r_mag = nn.Parameter(torch.empty(dict_size, device=device))
        self.gate_bias = nn.Parameter(torch.empty(dict_size, device=device))
        self.mag_bias = nn.Parameter(torch.empty(dict_size, device=device))
        self.decoder = nn.Linear(dict_size, self.output_dim, bias=False, device=device)
        if self.skip is not None:
            self.skip.to(device)
        if initialization == "default":
            self._reset_parameters()
        else:
            initialization(self)

    @property
    def decoder_bias(self) -> nn.Parameter:  # b_dec, a parameter of this name as upstream saves it
        try:
            return self._parameters["decoder_bias"]
        except KeyError:
            raise AttributeError("decoder_bias") from None

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """Zero biases and r_mag; random unit-norm decoder columns; encoder rows = decoder columns
        (for a transcoder of another width: random unit-norm rows)."""
        for parameter in (self.decoder_bias, self.r_mag, self.gate_bias, self.mag_bias):
            parameter.zero_()
        weight = torch.randn_like(self.decoder.weight)  # [output_dim, dict_size]
        self.decoder.weight.copy_(weight / weight.norm(dim=0, keepdim=True))
        if self.output_dim == self.activation_dim:
            self.encoder.weight.copy_(self.decoder.weight.t())
        else:
            rows = torch.randn_like(self.encoder.weight)  # [dict_size, activation_dim]
            self.encoder.weight.copy_(rows / rows.norm(dim=1, keepdim=True))

    # the two paths --------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, return_gate: bool = False, normalize_decoder: bool = False):
        """Features `[batch, dict_size]`; with return_gate also the gate path's
        `relu(pre + b_gate)`. With normalize_decoder the features are multiplied by the decoder
        column norms (for decoders not kept at unit norm), as upstream."""
        pre = self.encoder(self._encoder_input(x))  # [batch, dict_size]
        pre_gate = pre + self.gate_bias
        pre_mag = self.r_mag.exp() * pre + self.mag_bias
        f = (pre_gate > 0).to(pre_mag.dtype) * F.relu(pre_mag)
        if normalize_decoder:
            f = f * self.decoder.weight.norm(dim=0, keepdim=True)
        return (f, F.relu(pre_gate)) if return_gate else f

    def decode(self, f: torch.Tensor, normalize_decoder: bool = False, x: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Reconstruction `[batch, output_dim]` from features (upstream's `decode(f,
        normalize_decoder)`; a skip transcoder also needs the input `x`, which may be given second,
        as `decode(f, x)` on other classes)."""
        if isinstance(normalize_decoder, torch.Tensor):
            x, normalize_decoder = normalize_decoder, False
        if normalize_decoder:
            f = f / self.decoder.weight.norm(dim=0, keepdim=True)
        return self._add_skip(self.decoder(f) + self.decoder_bias, x)

    def forward(self, x: torch.Tensor, output_features: bool = False,
                normalize_decoder: bool = False):
        """Reconstruction (and features if output_features; with normalize_decoder those are scaled
        by the decoder column norms, the reconstruction is not)."""
        self.check_input(x)
        f = self.encode(x)
        x_hat = self.decode(f, x=x)
        if normalize_decoder:
            f = f * self.decoder.weight.norm(dim=0, keepdim=True)
        return (x_hat, f) if output_features else x_hat

    # scales ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply b_dec, b_mag and b_gate by `scale` (upstream's normalisation folding)."""
        for parameter in (self.decoder_bias, self.mag_bias, self.gate_bias):
            parameter.mul_(scale)

    def _input_scaled(self) -> list[torch.Tensor]:
        return [self.gate_bias, self.mag_bias]

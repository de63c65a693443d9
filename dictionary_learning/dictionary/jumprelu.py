"""JumpReLU SAE (Rajamanoharan et al. 2024): upstream's `JumpReluAutoEncoder`, also a transcoder.

A latent fires only when its pre-activation clears a learned per-latent threshold, and then passes
it unchanged:

    pre   = x @ W_enc + b_enc                 (x - b_dec with `apply_b_dec_to_input`,
          as some SAELens saves)
    f     = relu(pre * 1[pre > threshold])
    x_hat = f @ W_dec + b_dec (+ W_skip x)

Parameter names, layouts and the `ae.pt` keys are upstream's: `W_enc` [activation_dim, dict_size],
`b_enc`, `W_dec` [dict_size, output_dim] (rows are the feature directions), `b_dec`, `threshold`.
The training path (`gather_pre_activations`, `decode_sparse`) works on the active (row, latent)
pairs only: JumpReLU codes are sparse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse import SparseCode, gather_linear, sparse_decode
from .base import Dictionary, load_state_dict

INITIAL_THRESHOLD = 0.001  # the paper's Appendix I, as upstream
SAE_LENS_WEIGHTS, SAE_LENS_CONFIG = "sae_weights.safetensors", "cfg.json"
# no run-time rescaling at inference
SAE_LENS_NORMALIZATIONS = (None, "none", "expected_average_only_in")


class JumpReluAutoEncoder(Dictionary):
    """JumpReLU SAE: latents pass their pre-activation where it exceeds a learned per-latent
    threshold."""

    one_scale_sae = False  # fold_scale moves b_enc with the centring (below)

    def __init__(self, activation_dim: int, dict_size: int,
                 device: str | torch.device | None = "cpu", output_dim: int | None = None,
                 transcoder: bool = False, skip: bool = False):
        """Upstream's initialisation: unit-norm random rows of W_dec (Kaiming-uniform directions),
        W_enc = W_dec^T (for a transcoder of another width: its own unit-norm random columns), zero
        biases, thresholds 0.001."""
        super().__init__()
        activation_dim, dict_size = self._init_shared(activation_dim, dict_size, output_dim,
                                                      transcoder, skip)
        # created in upstream's order, so that one seed gives upstream's initial weights
        # upstream's [activation_dim, dict_size] as a transposed view of row-major storage (each
        # latent's encoder row contiguous for the sparse training path)
        self.W_enc = nn.Parameter(torch.empty(dict_size, activation_dim, device=device).t())
        self.b_enc = nn.Parameter(torch.zeros(dict_size, device=device))
        self.W_dec = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dict_size, self.output_dim,
                                                                       device=device)))
        self.b_dec = nn.Parameter(torch.zeros(self.output_dim, device=device))
        self.threshold = nn.Parameter(torch.full((dict_size,), INITIAL_THRESHOLD, device=device))
        # upstream's switch (set by SAELens loads): encode x - b_dec
        self.apply_b_dec_to_input = False
        if self.skip is not None:
            self.skip.to(device)
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            if self.output_dim == activation_dim:
                self.W_enc.copy_(self.W_dec.t())
            else:
                columns = nn.init.kaiming_uniform_(torch.empty(dict_size, activation_dim,
                                                               device=device))
                self.W_enc.copy_((columns / columns.norm(dim=1, keepdim=True)).t())

    # encode / decode ------------------------------------------------------------------------------
    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        self._check_width(x)
        return x - self.b_dec if self.apply_b_dec_to_input and not self.transcoder else x

    def encode(self, x: torch.Tensor, output_pre_jump: bool = False):
        """Features `[batch, dict_size]`; with output_pre_jump also the pre-activations
        (features, pre)."""
        pre = self._encoder_input(x) @ self.W_enc + self.b_enc  # [batch, dict_size]
        f = F.relu(pre * (pre > self.threshold))
        return (f, pre) if output_pre_jump else f

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction `[batch, output_dim]` (a skip transcoder also needs its input x)."""
        return self._add_skip(f @ self.W_dec + self.b_dec, x)

    # the sparse training path ---------------------------------------------------------------------
    def _encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(W, b, c) with pre-activations = (x - c) @ W.T + b for raw inputs x: W = W_enc^T
        [dict_size, activation_dim]; c is b_dec where the encoder reads x - b_dec, else None."""
        center = self.b_dec if self.apply_b_dec_to_input and not self.transcoder else None
        return self.W_enc.t(), self.b_enc, center

    def gather_pre_activations(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                               values: torch.Tensor) -> torch.Tensor:
        """The pre-activations `values` (computed without grad) at (rows, cols), differentiable with
        respect to the encoder (and x) through a sparse backward."""
        weight, bias, center = self._encoder_affine()
        return gather_linear(x, weight, bias, rows, cols, values, center)

    def decode_sparse(self, code: SparseCode, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction from a sparse code, through the active rows of W_dec only."""
        return self._add_skip(sparse_decode(code, self.W_dec.t()) + self.b_dec, x)

    # scales ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply b_dec, b_enc and the thresholds by `scale` (upstream's): afterwards
        `new(scale * x) == scale * old(x)`."""
        for parameter in (self.b_dec, self.b_enc, self.threshold):
            parameter.mul_(scale)

    @torch.no_grad()
    def fold_scale(self, scale_in: float, scale_out: float) -> None:
        """As the base; with `apply_b_dec_to_input` (pre = (x - b_dec) W_enc + b_enc) b_enc also
        takes up the move of the b_dec subtracted from the input, which scales with the output."""
        centred = self.apply_b_dec_to_input and not self.transcoder
        shift = (self.b_dec / scale_out - self.b_dec / scale_in) @ self.W_enc if centred else None
        super().fold_scale(scale_in, scale_out)
        if shift is not None:
            self.b_enc += shift

    def _input_scaled(self) -> list[torch.Tensor]:
        return [self.b_enc, self.threshold]

    def _decoder_weight(self) -> torch.Tensor:
        return self.W_dec

    # saving and loading ---------------------------------------------------------------------------
    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """As the base, but with `apply_b_dec_to_input` folded into b_enc (b_enc - b_dec @ W_enc),
        so that the file gives the same outputs in loaders that do not know the switch (upstream's
        never restore it)."""
        state = super().saved_state_dict()
        if self.apply_b_dec_to_input and not self.transcoder:
            state["b_enc"] = (self.b_enc - self.b_dec @ self.W_enc).detach().cpu().contiguous()
        return state

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], **kwargs) -> JumpReluAutoEncoder:
        for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            if key not in state_dict:
                raise ValueError(f"a JumpReluAutoEncoder state dict needs {key!r}; got keys "
                                 f"{sorted(state_dict)}")
        return super().from_state_dict(state_dict, **kwargs)

    @classmethod
    def _saved_widths(cls, state_dict: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        # W_enc [activation_dim, dict_size]
        return (*state_dict["W_enc"].shape, state_dict["W_dec"].shape[1])

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, load_from_sae_lens: bool = False,
                        dtype: torch.dtype | None = torch.float32,
                        device: str | torch.device | None = None, **kwargs) -> JumpReluAutoEncoder:
        """Upstream's loader: an `ae.pt` (or `.safetensors`, or a folder holding one) cast to
        `dtype` (float32 by default, as upstream; None keeps the saved dtype) on `device`. With
        `load_from_sae_lens`, `path` is a local SAELens folder (`cfg.json` +
        `sae_weights.safetensors`, as `SAE.save_model` writes and the hub holds); nothing is
        downloaded. Other `kwargs` (e.g. `transcoder`) go to `from_state_dict`."""
        if load_from_sae_lens:
            return load_sae_lens_folder(path, **kwargs).to(device=device, dtype=dtype)
        if path is None:
            raise ValueError("from_pretrained needs the path of an ae.pt file or of a folder "
                             "holding one")
        return cls.from_saved_state(load_state_dict(path), **kwargs).to(device=device, dtype=dtype)


def load_sae_lens_folder(path: str | Path | None, **kwargs: Any) -> JumpReluAutoEncoder:
    """A JumpReluAutoEncoder from a local SAELens JumpReLU folder, with SAELens'
    `apply_b_dec_to_input`."""
    if path is None:
        release = (f" (release={kwargs['release']!r}, sae_id={kwargs.get('sae_id')!r})"
                   if "release" in kwargs else "")
        raise ValueError(f"load_from_sae_lens reads a local SAELens folder{release}: pass path= "
                         f"the folder holding {SAE_LENS_CONFIG} and {SAE_LENS_WEIGHTS} (e.g. a hub "
                         "snapshot or `SAE.save_model` output); this toolkit does not download")
    folder = Path(path)
    if not (folder / SAE_LENS_CONFIG).exists() or not (folder / SAE_LENS_WEIGHTS).exists():
        raise ValueError(f"expected a SAELens folder with {SAE_LENS_CONFIG} and "
                         f"{SAE_LENS_WEIGHTS}, got {str(folder)!r}")
    config = json.loads((folder / SAE_LENS_CONFIG).read_text())
    architecture = config.get("architecture", "standard")
    if architecture != "jumprelu":
        raise ValueError(f"expected a SAELens 'jumprelu' SAE, got architecture {architecture!r} in "
                         f"{str(folder)!r}")
    if config.get("finetuning_scaling_factor"):
        raise ValueError("SAELens' finetuning_scaling_factor is not supported (as upstream)")
    if config.get("normalize_activations") not in SAE_LENS_NORMALIZATIONS:
        raise ValueError(f"SAELens' normalize_activations={config['normalize_activations']!r} "
                         "rescales inputs at run time, which a JumpReluAutoEncoder cannot; "
                         f"supported: {SAE_LENS_NORMALIZATIONS}")
    from safetensors.torch import load_file

    state = load_file(str(folder / SAE_LENS_WEIGHTS))
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise ValueError("this SAELens save carries a scaling_factor other than 1, which is not "
                         "supported")
    if (state["W_enc"].shape[0], state["W_enc"].shape[1]) != (config["d_in"], config["d_sae"]):
        raise ValueError(f"W_enc has shape {tuple(state['W_enc'].shape)}, but {SAE_LENS_CONFIG} "
                         f"says d_in={config['d_in']}, d_sae={config['d_sae']}")
    dictionary = JumpReluAutoEncoder.from_saved_state(state, **kwargs)
    dictionary.apply_b_dec_to_input = bool(config.get("apply_b_dec_to_input", True))
    return dictionary

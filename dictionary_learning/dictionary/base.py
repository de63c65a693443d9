"""The `Dictionary` base: encode / decode / forward, input checks, the transcoder plumbing shared by
every class (`output_dim`, the raw-input encoder, the optional linear skip), scale folding, config
and state-dict loading."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_memory, integer
from ..files import error_summary

TRANSCODER_MARKER = "is_transcoder"  # in saved transcoders' state dicts only
OPTIONAL_BUFFERS = {"threshold"}  # buffers that older upstream saves may lack
# --------------------------------------------------------------------------------------------------
# base


class Widths:
    """The widths in this package's names, over upstream's `activation_dim`, `dict_size` and
    `output_dim` (what dictionaries store, save and take in their constructors, and trainer configs'
    keys)."""

    @property
    def d_in(self) -> int:
        return self.activation_dim

    @property
    def d_sae(self) -> int:
        return self.dict_size

    @property
    def d_out(self) -> int:
        output_dim = getattr(self, "output_dim", None)
        return self.activation_dim if output_dim is None else output_dim


class Dictionary(Widths, ABC, nn.Module):
    """A dictionary: `encode` input -> features, `decode` features -> output, `forward` both."""

    activation_dim: int
    dict_size: int
    output_dim: int
    transcoder: bool
    # whether an SAE of this class refuses different input and output scales in `fold_scale`: its
    # encoder reads x - b_dec (`_encoder_input`), and one b_dec cannot move with both scales
    one_scale_sae = True

    @abstractmethod
    # [batch, activation_dim] -> [batch, dict_size]
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    # -> [batch, output_dim]
    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        ...

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """Reconstruction (and features if output_features)."""
        self.check_input(x)
        f = self.encode(x)
        x_hat = self.decode(f, x)
        return (x_hat, f) if output_features else x_hat

    # shared pieces --------------------------------------------------------------------------------
    def _init_shared(self, activation_dim: int, dict_size: int, output_dim: int | None,
                     transcoder: bool, skip: bool) -> tuple[int, int]:
        """Check and set the widths (integral numbers become ints) and the transcoder / skip
        plumbing; returns (activation_dim, dict_size) as ints."""
        activation_dim, dict_size = (integer("activation_dim", activation_dim),
                                     integer("dict_size", dict_size))
        output_dim = activation_dim if output_dim is None else integer("output_dim", output_dim)
        # the encoder and decoder in float32 (an estimate: training adds gradients and Adam's two
        # moments)
        check_memory("dict_size", dict_size, 4 * dict_size * (activation_dim + output_dim),
                     what=f" for the weights alone ({activation_dim} -> {dict_size} -> "
                          f"{output_dim}, float32)")
        self.activation_dim, self.dict_size, self.output_dim = activation_dim, dict_size, output_dim
        self.transcoder = bool(transcoder or skip or output_dim != activation_dim)
        self.skip = nn.Linear(activation_dim, output_dim, bias=False) if skip else None
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)
        return activation_dim, dict_size

    def check_input(self, x: torch.Tensor, check_dtype: bool = True) -> None:
        """Clear errors for inputs of the wrong type, width or dtype (`check_dtype=False`: any
        floating dtype, for callers that cast, as training does)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of shape [..., {self.activation_dim}], got "
                            f"{type(x).__name__}")
        self._check_width(x)
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
        param = next(self.parameters(), None)
        if (check_dtype and param is not None and x.dtype != param.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"expected input of the dictionary's dtype {param.dtype}, got "
                            f"{x.dtype}: cast one of them (x.to({param.dtype}) or "
                            f"dictionary.to({x.dtype}))")

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.activation_dim:
            raise ValueError(f"expected input width {self.activation_dim}, got shape "
                             f"{tuple(x.shape)}")

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        self._check_width(x)
        return x if self.transcoder else x - self.decoder_bias

    def _add_skip(self, out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if self.skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip connection: decode(f, x) needs the "
                                 "input x")
            out = out + self.skip(x)
        return out

    @property
    def decoder_bias(self) -> torch.Tensor:
        return self.b_dec

    @torch.no_grad()
    def fold_scale(self, scale_in: float, scale_out: float) -> None:
        """Make a dictionary trained on (scale_in * x, scale_out * y) work on raw (x, y): afterwards
        `new(x) == old(scale_in * x) / scale_out`, and features are `1 / scale_in` times the old
        ones."""
        for name, scale in (("scale_in", scale_in), ("scale_out", scale_out)):
            if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {scale!r}")
        if self.one_scale_sae and not self.transcoder and scale_in != scale_out:
            raise ValueError("an SAE reads and writes one space: scale_in must equal scale_out, "
                             f"got {scale_in} and {scale_out}")
        for tensor in self._input_scaled():
            tensor /= scale_in
        decoder_weight, decoder_bias = self._decoder_weight(), self.decoder_bias
        decoder_weight *= scale_in / scale_out
        decoder_bias /= scale_out
        if self.skip is not None:
            self.skip.weight *= scale_in / scale_out

    def _input_scaled(self) -> list[torch.Tensor]:
        """What scales with the input (`fold_scale` divides it by scale_in): encoder biases, a
        learned threshold."""
        return [self.encoder.bias, *self._learned_threshold()]

    def _learned_threshold(self) -> list[torch.Tensor]:
        """The inference threshold buffer, if the class has one and it was learned (-1: never)."""
        return [self.threshold] if hasattr(self, "threshold") and self.threshold >= 0 else []

    def _decoder_weight(self) -> torch.Tensor:
        """The decoder's weight, whatever its layout (`fold_scale` scales it)."""
        return self.decoder.weight

    def dictionary_config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild the dictionary (saved in config.json)."""
        config = {"dict_class": type(self).__name__, "activation_dim": self.activation_dim,
                  "dict_size": self.dict_size}
        if self.transcoder:
            config.update(output_dim=self.output_dim, transcoder=True, skip=self.skip is not None)
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, *,
                        dtype: torch.dtype | None = None, **kwargs):
        """Load from an `ae.pt` / `.safetensors` state dict, or a folder holding one (shapes read
        from the weights), on `device` (upstream's `(path, device)`), in float32 unless `dtype` is
        given (by keyword), whatever the file holds."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"{cls.__name__}.from_pretrained(path, device=None, *, dtype=None): "
                            f"got the dtype {device} where the device goes; pass it as "
                            f"dtype={device}")
        dictionary = cls.from_saved_state(load_state_dict(path), **kwargs)
        return dictionary.to(device=device, dtype=dtype)

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as files hold it: on the CPU, contiguous, and for transcoders with an
        `is_transcoder` entry, so that upstream's loaders (which have no transcoders) refuse the
        file instead of misreading it."""
        state = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        if self.transcoder:
            state[TRANSCODER_MARKER] = torch.tensor(True)
        return state

    @classmethod
    def from_saved_state(cls, state_dict: dict[str, torch.Tensor], **kwargs) -> Dictionary:
        """A dictionary holding a saved state dict (see `saved_state_dict`; buffers older saves
        lack, such as TopK's `threshold`, keep their initial values)."""
        state_dict = dict(state_dict)
        if state_dict.pop(TRANSCODER_MARKER, None) is not None and kwargs.get("transcoder") is None:
            kwargs["transcoder"] = True
        dictionary = cls.from_state_dict(state_dict, **kwargs)
        own = dictionary.state_dict()
        for name in OPTIONAL_BUFFERS & (set(own) - set(state_dict)):
            state_dict[name] = own[name]
        dictionary.load_state_dict(state_dict)
        return dictionary

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], **kwargs) -> Dictionary:
        """A new dictionary shaped as `state_dict` holds one (widths, skip, transcoder and the
        class's own settings read from it; `kwargs` go to the constructor), its weights not yet
        loaded (see `from_saved_state`)."""
        activation_dim, dict_size, output_dim = cls._saved_widths(state_dict)
        skip = "skip.weight" in state_dict
        transcoder = kwargs.pop("transcoder", None)
        if transcoder is None:
            transcoder = skip or output_dim != activation_dim
        settings = {**cls._extra_from_state_dict(state_dict), **kwargs}
        return cls(activation_dim=activation_dim, dict_size=dict_size, output_dim=output_dim,
                   transcoder=transcoder, skip=skip, **settings)

    @classmethod
    def _saved_widths(cls, state_dict: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        """(activation_dim, dict_size, output_dim) from nn.Linear weights: encoder
        [dict_size, activation_dim], decoder [output_dim, dict_size]."""
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        return activation_dim, dict_size, state_dict["decoder.weight"].shape[0]

    @classmethod
    def _extra_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Constructor arguments the class reads from a state dict besides the widths (those given
        to `from_state_dict` win)."""
        return {}


def apply_to_values(dictionary: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """The dictionary's output on model values `[..., d]`, computed in its own dtype and returned in
    theirs (a dictionary without parameters, IdentityDict, keeps x's dtype)."""
    param = next(dictionary.parameters(), x)
    flat = x.reshape(-1, x.shape[-1]).to(param.dtype)
    return dictionary(flat).reshape(*x.shape[:-1], -1).to(x.dtype)


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
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    # truncated, corrupt, or a pickle that would run code (refused by weights_only)
    except Exception as error:
        raise ValueError(f"cannot read weights from {str(path)!r}: the file is corrupt or "
                         "truncated, or holds objects other than tensors, which are refused "
                         "because unpickling them could run code "
                         f"({error_summary(error)})") from error

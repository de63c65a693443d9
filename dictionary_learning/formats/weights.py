"""One library-neutral form of a dictionary's inference computation, which every format converter
reads and writes.

    pre = (x - b_dec if centred else x) @ W_enc.T + b_enc        W_enc [d_sae, d_in]
    f   = relu(pre)                              activation "relu"
        = relu(pre) where pre > threshold        activation "jumprelu" (threshold [d_sae])
        = the k largest of relu(pre)             activation "topk"
    out = f @ W_dec + b_dec (+ x @ W_skip.T)                    W_dec [d_sae, d_out],
        W_skip [d_out, d_in]

`weights_of(dictionary)` reads any of this toolkit's dictionaries into it (BatchTopK and Matryoshka
SAEs through their inference rule, a learned threshold: "jumprelu"); `dictionary_from(weights)`
builds the toolkit's class that computes the same thing. Orientations differ between libraries
(ecosystem findings, section 2.0): each converter transposes here, nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..dictionary import (
    AutoEncoder,
    AutoEncoderNew,
    AutoEncoderTopK,
    BatchTopKSAE,
    Dictionary,
    JumpReluAutoEncoder,
    MatryoshkaBatchTopKSAE,
)
from ..models import buffer_io
from .hooks import named_hooks

ACTIVATIONS = ("relu", "jumprelu", "topk")
# a threshold no finite pre-activation exceeds (Matryoshka's inactive groups)
NEVER = torch.finfo(torch.float32).max


@dataclass
class Weights:
    """A dictionary's inference computation (see the module docstring), on the CPU, plus where it
    reads and writes: `hooks` as `[{"path", "io"}]` (one for an SAE, input side then output side for
    a transcoder), `model_name`, `layer`."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    activation: str = "relu"
    k: int | None = None
    threshold: torch.Tensor | None = None
    W_skip: torch.Tensor | None = None
    centred: bool = False
    transcoder: bool = False
    model_name: str | None = None
    layer: int | None = None
    hooks: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        d_sae, d_in = self.W_enc.shape
        checks = {"b_enc": (self.b_enc, (d_sae,)), "W_dec": (self.W_dec, (d_sae, self.d_out)),
                  "threshold": (self.threshold, (d_sae,)),
                  "W_skip": (self.W_skip, (self.d_out, d_in))}
        for name, (tensor, shape) in checks.items():
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for W_enc "
                                 f"{tuple(self.W_enc.shape)} and b_dec {tuple(self.b_dec.shape)}, "
                                 f"got {tuple(tensor.shape)}")
        if self.activation == "topk" and not (isinstance(self.k, int) and 0 < self.k <= d_sae):
            raise ValueError(f"a topk dictionary needs k in [1, {d_sae}], got {self.k!r}")
        if self.activation == "jumprelu" and self.threshold is None:
            raise ValueError("a jumprelu dictionary needs a threshold [d_sae]")
        if self.centred and (self.transcoder or d_in != self.d_out):
            raise ValueError("only an SAE (same input and output) can subtract b_dec from its "
                             "input")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_out(self) -> int:
        return self.b_dec.shape[0]

    def with_centring(self, centred: bool) -> Weights:
        """The same computation with b_dec subtracted from the input (centred) or not: b_enc absorbs
        W_enc @ b_dec."""
        if centred == self.centred:
            return self
        shift = self.W_enc.double() @ self.b_dec.double()
        b_enc = self.b_enc.double() + (shift if centred else -shift)
        return replace(self, b_enc=b_enc.to(self.b_enc.dtype), centred=centred)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation in the module docstring (for tests and checks): features
        `[n, d_sae]`."""
        pre = (x - self.b_dec if self.centred else x) @ self.W_enc.T + self.b_enc
        f = pre.relu()
        if self.activation == "jumprelu":
            f = f * (pre > self.threshold)
        elif self.activation == "topk":
            values, indices = f.topk(self.k, dim=-1)
            f = torch.zeros_like(f).scatter_(-1, indices, values)
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encode(x) @ self.W_dec + self.b_dec
        return out + x @ self.W_skip.T if self.W_skip is not None else out


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().cpu().float().contiguous().clone()


def weights_of(dictionary: Dictionary, config: dict[str, Any] | None = None) -> Weights:
    """The library-neutral form of one of this toolkit's dictionaries; `config` (a saved
    folder's config.json) supplies the model name, layer and hook points."""
    skip = (_detached(dictionary.skip.weight) if getattr(dictionary, "skip", None) is not None
            else None)
    common: dict[str, Any] = {"W_skip": skip, "transcoder": bool(dictionary.transcoder)}
    if isinstance(dictionary, (AutoEncoder, AutoEncoderTopK, BatchTopKSAE, AutoEncoderNew)):
        common.update(W_enc=dictionary.encoder.weight, b_enc=dictionary.encoder.bias,
                      W_dec=dictionary.decoder.weight.T, b_dec=dictionary.decoder_bias,
                      centred=(not dictionary.transcoder
                               and not isinstance(dictionary, AutoEncoderNew)))
    elif isinstance(dictionary, (JumpReluAutoEncoder, MatryoshkaBatchTopKSAE)):
        centred = (not dictionary.transcoder and (isinstance(dictionary, MatryoshkaBatchTopKSAE)
                                                  or bool(dictionary.apply_b_dec_to_input)))
        common.update(W_enc=dictionary.W_enc.T, b_enc=dictionary.b_enc, W_dec=dictionary.W_dec,
                      b_dec=dictionary.b_dec, centred=centred)
    else:
        raise ValueError(f"{type(dictionary).__name__} has no equivalent in the other libraries' "
                         "formats; convertible: AutoEncoder, AutoEncoderNew, AutoEncoderTopK, "
                         "BatchTopKSAE, JumpReluAutoEncoder, MatryoshkaBatchTopKSAE")
    common = {key: _detached(value) if isinstance(value, torch.Tensor) else value
              for key, value in common.items()}
    if isinstance(dictionary, AutoEncoderTopK):
        common.update(activation="topk", k=int(dictionary.k))
    elif isinstance(dictionary, JumpReluAutoEncoder):
        # relu(pre * (pre > t)) == relu(pre) * (pre > max(t, 0)): thresholds below 0 act as 0
        common.update(activation="jumprelu", threshold=_detached(dictionary.threshold).clamp_min(0))
    elif isinstance(dictionary, (BatchTopKSAE, MatryoshkaBatchTopKSAE)):
        if getattr(dictionary, "batch_topk_fallback", False) and dictionary.threshold < 0:
            raise ValueError(f"this {type(dictionary).__name__} has no learned threshold and "
                             "batch_topk_fallback=True: its inference depends on the batch, which "
                             "no other format can express")
        threshold = torch.full((dictionary.d_sae,), max(float(dictionary.threshold), 0.0))
        if isinstance(dictionary, MatryoshkaBatchTopKSAE):
            threshold[dictionary.active_end:] = NEVER  # latents of groups not yet active never fire
        common.update(activation="jumprelu", threshold=threshold, k=int(dictionary.k))
    weights = Weights(**common)
    if config:
        trainer = config.get("trainer", {})
        weights.model_name = trainer.get("lm_name")
        weights.hooks = named_hooks(saved_hooks(config), weights.model_name)
        weights.layer = trainer.get("layer", hook_layer(weights.hooks))
    return weights


def hook_layer(hooks: list[dict[str, Any]]) -> int | None:
    """The layer that named hook points (`layers.6.mlp_in`) share, else None."""
    layers = {re.match(r"layers\.(\d+)\.", hook.get("name") or "") for hook in hooks}
    return int(layers.pop().group(1)) if len(layers) == 1 and None not in layers else None


def saved_hooks(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The hook points a saved dictionary read (and wrote), from its config.json: the buffer's
    hooks, or, when one buffer fed many trainers (its `submodule` a dict by entry name), those of
    the entry named by the trainer's `submodule_name` ([] when it names none). Each is
    `{"path", "io"}` plus its `name` where the buffer gave one."""
    run = config.get("run")  # quickstart saves before 2026-12-07 kept the buffer there
    buffer = config.get("buffer") or (run.get("buffer") if isinstance(run, dict) else None) or {}
    hooks = [h for h in buffer.get("hooks", []) if isinstance(h, dict) and h.get("path")]
    entries = buffer.get("submodule")
    if isinstance(entries, dict):
        wanted = entries.get(config.get("trainer", {}).get("submodule_name"), [])
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        by_name = {h.get("name") or f"{h['path']}.{h.get('io', 'output')}": h for h in hooks}
        hooks = [by_name[name] for name in wanted if name in by_name]
    return [{"path": h["path"], "io": h.get("io", "output"),
             **({"name": h["name"]} if h.get("name") else {})}
            for h in hooks]


def dictionary_from(weights: Weights) -> Dictionary:
    """This toolkit's dictionary that computes what `weights` describe: AutoEncoder (relu),
    AutoEncoderTopK (topk), JumpReluAutoEncoder (jumprelu), as a transcoder when
    `weights.transcoder`, with a skip when W_skip is given."""
    shape = {"activation_dim": weights.d_in, "dict_size": weights.d_sae,
             "output_dim": weights.d_out, "transcoder": weights.transcoder,
             "skip": weights.W_skip is not None}
    sae = not weights.transcoder
    if weights.activation == "jumprelu":
        dictionary: Dictionary = JumpReluAutoEncoder(**shape)
        dictionary.apply_b_dec_to_input = weights.centred
        state = {"W_enc": weights.W_enc.T, "b_enc": weights.b_enc, "W_dec": weights.W_dec,
                 "b_dec": weights.b_dec, "threshold": weights.threshold}
    else:
        # AutoEncoder / AutoEncoderTopK centre an SAE's input, not a transcoder's
        weights = weights.with_centring(sae)
        if weights.activation == "topk":
            dictionary = AutoEncoderTopK(k=weights.k, **shape)
            state = {"decoder.weight": weights.W_dec.T, "b_dec": weights.b_dec}
        else:
            dictionary = AutoEncoder(**shape)
            state = {"decoder.weight": weights.W_dec.T, "bias": weights.b_dec}
        state.update({"encoder.weight": weights.W_enc, "encoder.bias": weights.b_enc})
    if weights.W_skip is not None:
        state["skip.weight"] = weights.W_skip
    own = dictionary.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))
    return dictionary


def toolkit_config(dictionary: Dictionary, weights: Weights, source: str) -> dict[str, Any]:
    """A config.json for an imported dictionary: the trainer block this toolkit's loaders read
    (model, layer), and the hook points, named by site where a family adapter knows them, in the
    buffer block (as a trained dictionary's)."""
    trainer: dict[str, Any] = {**dictionary.dictionary_config(), "imported_from": source}
    hooks = named_hooks(weights.hooks, weights.model_name)
    layer = weights.layer if weights.layer is not None else hook_layer(hooks)
    if weights.model_name:
        trainer["lm_name"] = weights.model_name
    if layer is not None:
        trainer["layer"] = layer
    config: dict[str, Any] = {"trainer": trainer}
    if hooks:
        names = [hook.get("name") or f"{hook['path']}.{hook['io']}" for hook in hooks]
        config["buffer"] = {"hooks": hooks, "submodule": names if len(hooks) == 2 else names[0],
                            "io": buffer_io([hook["io"] for hook in hooks])}
    return config

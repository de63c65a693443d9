"""The SCAE wing's nnsight runs: `clean_targets` (what each module should reconstruct) and
`patched_logits` (the logits with given codes' reconstructions patched in) go through the package's
door, `tracing.run`; `run_suite` (the model with every module's reconstruction patched in,
recording what the linearisation needs) is the one trace written by hand (its docstring says
why)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..models import HookPoint, get_adapter, norm_params
from ..tracing import hook_value, logits_or_stop, model_inputs, read, run, tokenize, write
from .suite import SCAESuite

Encoding = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LayerPoints:
    """The hook points of one layer that a suite reads and writes."""

    # the residual stream before the layer (input of the pre-attention norm)
    attn_norm_in: HookPoint
    attn_out: HookPoint  # attention output: (output, pattern, ...) under eager attention
    mlp_norm_in: HookPoint  # the residual stream between attention and MLP
    mlp_in: HookPoint
    mlp_out: HookPoint


def layer_points(model: Any, layer: int) -> LayerPoints:
    adapter = get_adapter(model)
    block = adapter.block(layer)
    return LayerPoints(
        attn_norm_in=HookPoint(f"{block}.{adapter.attn_norm}", "input"),
        attn_out=HookPoint(*adapter.site_path(layer, "attn_out")),
        mlp_norm_in=HookPoint(f"{block}.{adapter.mlp_norm}", "input"),
        mlp_in=HookPoint(*adapter.site_path(layer, "mlp_in")),
        mlp_out=HookPoint(*adapter.site_path(layer, "mlp_out")),
    )


def encode_texts(model: Any, texts: list[str] | Encoding, ctx_len: int) -> Encoding:
    """Texts tokenized as every SCAE trace feeds them (an encoding passes through)."""
    return texts if isinstance(texts, dict) else tokenize(model.tokenizer, texts, ctx_len)


@dataclass
class SuiteRecord:
    """What one run of the model with the suite patched in recorded, for tokens `[batch, seq]`."""

    mask: torch.Tensor  # [batch, seq] real tokens
    embedding: torch.Tensor  # [batch, seq, d_model]: the residual stream before layer 0
    codes: dict[str, torch.Tensor]  # module -> [batch, seq, d_sae] TopK codes
    encoder_inputs: dict[str, torch.Tensor]  # module -> [batch, seq, d_model] what its encoder read
    # "attn_L" / "mlp_L" -> [batch, seq] s(t) of the norm before it
    norm_scales: dict[str, torch.Tensor]
    patterns: dict[int, torch.Tensor]  # layer -> [batch, heads, seq, seq]


@torch.no_grad()
def run_suite(suite: SCAESuite, model: Any, texts: list[str] | Encoding, ctx_len: int = 128,
              logits: bool = True
              ) -> tuple[SuiteRecord, torch.Tensor | None]:
    """Run the model on `texts` (or an encoding from `tokenize`) with every module's reconstruction
    patched in (attention outputs replaced by the attention SAEs' reconstructions, MLP outputs by
    the transcoders'), recording codes, norm scales and attention patterns. Returns the record and
    the logits (None with `logits=False`, which stops the pass after the suite's last layer). The
    model must run eager attention (`load_model(..., attn_implementation="eager")`) so that
    attention modules return their patterns.

    The one trace outside `tracing.run`, on purpose: it records what that door hides (element 1
    of the attention output's tuple, the pattern) and what is computed inside the pass (each
    module's codes, both saved and decoded into the patch); through the door, patch functions
    would have to smuggle those values out."""
    suite.check_model(model)
    encoding = encode_texts(model, texts, ctx_len)
    saved: dict[str, Any] = {}
    with model.trace(model_inputs(encoding)) as tracer:
        for layer in range(suite.n_layers):
            points = layer_points(model, layer)
            saved[f"resid_pre_{layer}"] = read(model, points.attn_norm_in).save()
            attn_output = hook_value(model, points.attn_out)
            if attn_output[1] is None:
                raise ValueError("the model's attention returns no patterns: load it with "
                                 "attn_implementation='eager'")
            sae = suite[f"attn_{layer}"]
            attn_out = attn_output[0]
            codes = sae.encode(attn_out)
            saved[f"codes_attn_{layer}"] = codes.save()
            saved[f"input_attn_{layer}"] = attn_out.save()
            saved[f"pattern_{layer}"] = attn_output[1].save()
            write(model, points.attn_out, attn_output, sae.decode(codes))
            saved[f"resid_mid_{layer}"] = read(model, points.mlp_norm_in).save()
            mlp_in = read(model, points.mlp_in)
            transcoder = suite[f"mlp_{layer}"]
            codes = transcoder.encode(mlp_in)
            saved[f"codes_mlp_{layer}"] = codes.save()
            saved[f"input_mlp_{layer}"] = mlp_in.save()
            write(model, points.mlp_out, None, transcoder.decode(codes))
        saved["logits"] = logits_or_stop(model, tracer, logits)
    norm_scales = {}
    for layer in range(suite.n_layers):
        norm_scales[f"attn_{layer}"] = (norm_params(model, layer, "attn")
                                        .scale(saved[f"resid_pre_{layer}"]))
        norm_scales[f"mlp_{layer}"] = (norm_params(model, layer, "mlp")
                                       .scale(saved[f"resid_mid_{layer}"]))
    record = SuiteRecord(
        mask=encoding["attention_mask"].bool(),
        embedding=saved["resid_pre_0"],
        codes={name: saved[f"codes_{name}"] for name in suite.names},
        encoder_inputs={name: saved[f"input_{name}"] for name in suite.names},
        norm_scales=norm_scales,
        patterns={layer: saved[f"pattern_{layer}"] for layer in range(suite.n_layers)},
    )
    return record, saved.get("logits")  # none when the trace stopped early


def _module_outputs(model: Any, suite: SCAESuite) -> dict[str, HookPoint]:
    """The hook point each module of the suite reconstructs, by name: attention and MLP outputs."""
    points = [layer_points(model, layer) for layer in range(suite.n_layers)]
    return {name: point for layer, p in enumerate(points)
            for name, point in ((f"attn_{layer}", p.attn_out), (f"mlp_{layer}", p.mlp_out))}


def clean_targets(suite: SCAESuite, model: Any, encoding: Encoding,
                  logits: bool = False) -> dict[str, torch.Tensor]:
    """What each module should reconstruct, from the clean model: attention outputs and MLP outputs
    (and, with `logits=True`, the clean logits under "logits"; otherwise the pass stops after the
    suite's last layer)."""
    outputs = _module_outputs(model, suite)
    values, clean_logits = run(model, encoding, read=list(outputs.values()), logits=logits)
    saved = dict(zip(outputs, values))
    if logits:
        saved["logits"] = clean_logits
    return saved


def _decoded(module: Any, codes: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A patch that replaces a module's output by the module's reconstruction from `codes`."""
    return module.decode(codes)


def patched_logits(suite: SCAESuite, model: Any, encoding: Encoding,
                   codes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits with every attention output and MLP output replaced by the suite's reconstruction from
    `codes`, in one nnsight trace (differentiable in the codes and the decoders)."""
    patch = {point: partial(_decoded, suite[name], codes[name])
             for name, point in _module_outputs(model, suite).items()}
    return run(model, encoding, patch=patch, grad=True).logits

"""HeadActivationBuffer: per-head activations of one layer's attention, upstream's buffer for SAEs
on single heads.

Each token gives the input of the attention's output projection split into heads,
`[n_heads, head_dim]` (the heads' weighted values, before they are mixed), or with `apply_W_O` each
head's own term of the attention output, `[n_heads, d_model]`: head h's slice of the projection
input through its slice of the projection weight, plus the projection's bias (as upstream, which
projects each head alone through the whole projection layer).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..models import AttentionOV, HookPoint, attention_ov, get_adapter, get_module, n_layers
from .activation import ActivationBuffer
from .settings import UPSTREAM_SIZES, BufferSettings, takes_settings


def output_projection_path(model: Any, layer: int, ov: AttentionOV) -> str:
    """Dotted path of the module inside a layer's attention that holds the output weight `ov.W_O` (a
    view of that module's weight), found through the adapter's attention weights instead of a
    family's module name."""
    attention = f"{get_adapter(model).block(layer)}.{get_adapter(model).attn}"
    weight = ov.W_O._base if ov.W_O._base is not None else ov.W_O
    for name, module in get_module(model, attention).named_modules():
        if name and getattr(module, "weight", None) is weight:
            return f"{attention}.{name}"
    raise ValueError(f"no module inside {attention} holds the attention output weight; "
                     "HeadActivationBuffer needs attention_ov(model, layer).W_O to be a view of "
                     "that module's weight")


class HeadActivationBuffer(ActivationBuffer):
    """Iterator over per-head activation batches of attention layer `layer`: `[out_batch_size,
    n_heads, head_dim]`, or `[out_batch_size, n_heads, d_model]` with apply_W_O.

    Takes upstream's arguments in upstream's order; `remote` (nnsight remote execution) is not
    supported here. Padding is dropped; the other options (dtype, seed, remove_bos, ...) are
    ActivationBuffer's, by keyword.
    """

    @takes_settings((*UPSTREAM_SIZES, "apply_W_O", "remote"))
    def __init__(self, data: Iterable[str], model: Any, layer: int, *, settings: BufferSettings,
                 apply_W_O: bool = False, **options: Any):
        if settings.remote:
            raise NotImplementedError("HeadActivationBuffer(remote=True): nnsight remote execution "
                                      "is not supported by this toolkit's buffers; run the model "
                                      "locally")
        layers = n_layers(model)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers:
            raise ValueError(f"layer must be an int in [0, {layers - 1}] for this model, got "
                             f"{layer!r}")
        ov = attention_ov(model, layer)
        self.layer, self.apply_W_O = layer, apply_W_O
        # W_O: [n_heads, head_dim, d_model]
        self.n_heads, self.head_dim, self.resid_dim = ov.W_O.shape
        self._W_O = ov.W_O.detach()
        self._b_O = ov.b_O.detach() if ov.b_O is not None else None
        point = HookPoint(output_projection_path(model, layer, ov), "input",
                          name=f"layers.{layer}.heads")
        super().__init__(data, model, point, None, "in", **settings.arguments(), **options)

    def _transform(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        # [batch, seq, n_heads, head_dim]
        heads = values[0].unflatten(-1, (self.n_heads, self.head_dim))
        if not self.apply_W_O:
            return [heads]
        # [batch, seq, n_heads, d_model]
        per_head = torch.einsum("bshe,hed->bshd", heads, self._W_O.to(heads))
        return [per_head + self._b_O.to(heads) if self._b_O is not None else per_head]

    @property
    def config(self) -> dict[str, Any]:
        return {"layer": self.layer, "apply_W_O": self.apply_W_O, "n_heads": self.n_heads,
                **super().config}

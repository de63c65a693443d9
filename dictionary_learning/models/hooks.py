"""Hook points: a module (dotted path in the Hugging Face model) and its input or output, named
sites per layer, and the order in which a forward pass reaches them."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import SITES, get_adapter, get_module, module_paths, n_layers, torch_model


@dataclass(frozen=True)
class HookPoint:
    """A place to read or write activations: a module (dotted path in the HF model) and its input or
    output.

    Tuple-valued inputs / outputs (attention modules return `(out, weights)`) are read at element 0.
    """

    path: str
    io: str = "output"  # "input" | "output"
    name: str | None = None  # e.g. "layers.6.mlp_out"

    def __post_init__(self):
        if self.io not in ("input", "output"):
            raise ValueError(f"HookPoint.io must be 'input' or 'output', got {self.io!r}")

    def __str__(self) -> str:
        return self.name or f"{self.path}.{self.io}"


def hook(model: Any, layer: int, site: str) -> HookPoint:
    """Named hook point: `hook(model, layer=6, site="mlp_out")`. Sites: resid, attn_out, mlp_in,
    mlp_out."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid sites: {list(SITES)}")
    layers = n_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < layers:
        raise ValueError(f"layer must be an int in [0, {layers - 1}] for this model, got {layer!r}")
    path, io = get_adapter(model).site_path(layer, site)
    return HookPoint(path, io, name=f"layers.{layer}.{site}")


def resolve_hook(model: Any, submodule: Any, io: str = "output") -> HookPoint:
    """Turn a HookPoint, dotted path, nnsight Envoy or torch module into a validated HookPoint.

    A string may also be a named site `"layers.6.mlp_out"`.
    """
    if io not in ("input", "output"):
        raise ValueError(f"io must be 'input' or 'output', got {io!r}")
    if isinstance(submodule, HookPoint):
        get_module(model, submodule.path)
        return submodule
    if isinstance(submodule, str):
        parts = submodule.split(".")
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in SITES:
            return hook(model, int(parts[1]), parts[2])
        if parts[-1] in SITES:
            raise ValueError(f"named sites are written 'layers.<layer>.<site>', got {submodule!r}")
        get_module(model, submodule)
        return HookPoint(submodule, io)
    envoy_path = getattr(submodule, "path", None)
    if isinstance(envoy_path, str) and not isinstance(submodule, nn.Module):  # an nnsight Envoy
        path = envoy_path.split(".", 1)[1] if "." in envoy_path else ""
        get_module(model, path)
        return HookPoint(path, io)
    if isinstance(submodule, nn.Module):
        for name, module in torch_model(model).named_modules():
            if module is submodule:
                return HookPoint(name, io)
        raise ValueError(f"module {type(submodule).__name__} is not part of the model")
    raise TypeError(
        "submodule must be a HookPoint, dotted path, nnsight Envoy or torch module, got "
        f"{type(submodule).__name__}"
    )


# torch model -> {(path, io): position}
_ORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def execution_order(model: Any) -> dict[tuple[str, str], int]:
    """{(module path, "input" | "output"): position} in the order one forward pass reaches them,
    recorded once per model with forward hooks on a two-token input (first call of each module).
    Empty when the model cannot run here (e.g. weights on the meta device); `execution_key` then
    falls back to registration order."""
    module = torch_model(model)
    if module in _ORDERS:
        return _ORDERS[module]
    events: dict[tuple[str, str], int] = {}
    handles = []

    def record(path: str, io: str) -> None:
        events.setdefault((path, io), len(events))

    for path, child in module.named_modules():
        if path:
            handles.append(child.register_forward_pre_hook(lambda m, args, path=path:
                                                           record(path, "input")))
            handles.append(child.register_forward_hook(lambda m, args, out, path=path:
                                                       record(path, "output")))
    try:
        device = next(module.parameters()).device
        with torch.no_grad():
            ids = torch.zeros(1, 2, dtype=torch.long, device=device)
            module(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception:  # a model that cannot run a dummy pass here: registration order instead
        events = {}
    finally:
        for handle in handles:
            handle.remove()
    _ORDERS[module] = events
    return events


def execution_key(model: Any, point: HookPoint) -> tuple[int, int]:
    """Sort key putting hook points in the order a forward pass reaches them (inputs
    before outputs).

    The order is recorded from a real forward pass (`execution_order`), so modules registered in
    another order than they run (GPT-NeoX's post-attention norm before its attention) and a module's
    output against its parent's (GPT-2's MLP and its block) sort right. Without a recording,
    registration order is used: a module's output then comes after every module it contains, so
    outputs sort by the last descendant.
    """
    recorded = execution_order(model)
    if (point.path, point.io) in recorded:
        return (recorded[(point.path, point.io)], 0)
    order = {name: i for i, name in enumerate(module_paths(model))}
    if point.io == "input":
        return (order[point.path], 0)
    last = max(i for name, i in order.items()
               if name == point.path or name.startswith(point.path + "."))
    return (last, 1)

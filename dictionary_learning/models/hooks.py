"""Hook points: a module (dotted path in the Hugging Face model) and its input or output, named sites per layer,
and the order in which a forward pass reaches them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .adapters import SITES, get_adapter, get_module, module_paths, n_layers, torch_model


@dataclass(frozen=True)
class HookPoint:
    """A place to read or write activations: a module (dotted path in the HF model) and its input or output.

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
    """Named hook point: `hook(model, layer=6, site="mlp_out")`. Sites: resid, attn_out, mlp_in, mlp_out."""
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
        f"submodule must be a HookPoint, dotted path, nnsight Envoy or torch module, got {type(submodule).__name__}"
    )


def execution_key(model: Any, point: HookPoint) -> tuple[int, int]:
    """Sort key putting hook points in the order a forward pass reaches them (inputs before outputs).

    Registration order of modules equals execution order for the decoder families adapted here. A module's output
    comes after every module it contains, so outputs sort by the last descendant.
    """
    order = {name: i for i, name in enumerate(module_paths(model))}
    if point.io == "input":
        return (order[point.path], 0)
    last = max(i for name, i in order.items() if name == point.path or name.startswith(point.path + "."))
    return (last, 1)

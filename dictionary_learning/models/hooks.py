"""Hook points: a module (dotted path in the Hugging Face model) and its input or output, named
sites per layer, and the order in which a forward pass reaches them; and the one translation
between upstream's buffer `io` ("out" / "in" / "in_to_out") and the hook points it reads
(`submodule_points`, and back: `buffer_io`)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
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


# upstream's `io` for what a buffer reads at a submodule: its output, its input, or its input and
# output (a transcoder's (x, y) pair)
BUFFER_IO = ("out", "in", "in_to_out")
# every spelling upstream's buffers and loss_recovered take, to its meaning in BUFFER_IO
# ("in_and_out" is upstream's other name for the pair)
UPSTREAM_IO = {"out": "out", "in": "in", "in_to_out": "in_to_out", "in_and_out": "in_to_out"}


def hook_io(io: str) -> str:
    """One side in a buffer's spelling ("in" / "out") as a HookPoint's io ("input" / "output")."""
    if io not in ("in", "out"):
        raise ValueError(f"io must be 'in' or 'out', got {io!r}")
    return "input" if io == "in" else "output"


def submodule_points(model: Any, submodule: Any, io: str) -> tuple[HookPoint, ...]:
    """The hook points upstream's `(submodule, io)` reads: one for io="out" / "in" (the output /
    input of a module, dotted path or Envoy; a HookPoint keeps its own side), and (input side,
    output side) for "in_to_out" (upstream also "in_and_out"): one module's input and output, or a
    pair `(input_side, output_side)`."""
    if io not in UPSTREAM_IO:
        raise ValueError(f"io must be one of {sorted(UPSTREAM_IO)}, got {io!r}")
    if UPSTREAM_IO[io] == "in_to_out":
        if isinstance(submodule, (tuple, list)):
            if len(submodule) != 2:
                raise ValueError(f"io={io!r} takes one submodule or a pair, got "
                                 f"{len(submodule)} items")
            sides = (resolve_hook(model, submodule[0], "input"),
                     resolve_hook(model, submodule[1], "output"))
        else:
            sides = (resolve_hook(model, submodule, "input"),
                     resolve_hook(model, submodule, "output"))
        # x would equal y: an identity to learn
        if (sides[0].path, sides[0].io) == (sides[1].path, sides[1].io):
            raise ValueError(f"io={io!r} needs two different hook points, but {submodule!r} "
                             f"names one, {sides[0]}: pass a module or path (its input and output "
                             "are read) or a pair (input point, output point)")
        return sides
    if isinstance(submodule, (tuple, list)):
        raise ValueError(f"a pair of submodules needs io='in_to_out', got io={io!r}")
    return (resolve_hook(model, submodule, hook_io(io)),)


def buffer_io(sides: Sequence[str]) -> str:
    """The buffer `io` (as saved in a config) that reads hook points with these io values:
    "in_to_out" for an (input side, output side) pair, "in" for one input, "out" for one output."""
    if len(sides) == 2:
        return "in_to_out"
    if len(sides) != 1:
        raise ValueError(f"a buffer reads one hook point or a pair, got {len(sides)}")
    return "in" if sides[0] == "input" else "out"


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

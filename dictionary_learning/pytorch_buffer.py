"""The collector's PyTorch-hooks reader, and upstream's `pytorch_buffer`: the ActivationBuffer over
a plain Hugging Face model, without nnsight.

`collect` has `tracing.collect`'s signature: forward hooks record the hook points' values, and the
forward pass ends with `EarlyStopException` once the last of them is reached. `ActivationBuffer`
is `dictionary_learning.buffer.ActivationBuffer` with this reader and upstream's constructor: on
the same texts it serves the same vectors in the same order (left-padded batches get the positions
of their unpadded texts; padding, and with remove_bos each context's first token, are dropped).
Differences from upstream, on purpose: io="in" reads the module's input (upstream reads the output
for either io), inputs go to the model's device (upstream sends them to the storage device), the
texts are used to the last one, and `remove_bos` / the norm filter mean what they mean in
`dictionary_learning.buffer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .buffer import ActivationBuffer as NNsightBuffer
from .buffer.settings import UPSTREAM_FILTERS, UPSTREAM_SIZES, BufferSettings, takes_settings
from .models import HookPoint, get_module, hook_io, resolve_hook, torch_model
from .tracing import Keep, model_inputs, read_value


class EarlyStopException(Exception):
    """Raised by a forward hook to end a forward pass once the activations it needs are read."""


def read_with_hooks(model: nn.Module, points: Sequence[HookPoint], inputs: dict[str, torch.Tensor],
                    grad: bool = False) -> list[torch.Tensor]:
    """The values at `points` (element 0 of tuples; each module's first call) when
    `model(**inputs)` runs, in the order given; the pass stops once the last of them is reached.
    grad=True keeps the autograd graph."""
    module = torch_model(model)
    captured: dict[int, torch.Tensor] = {}

    def keep(index: int, value: Any) -> None:
        captured.setdefault(index, read_value(value))
        if len(captured) == len(points):  # the last of them: nothing after it is needed
            raise EarlyStopException(f"stopped after reading {points[index]}")

    def first_input(args: tuple, kwargs: dict) -> Any:
        return args if args else next(iter(kwargs.values()), None)

    handles = []
    for index, point in enumerate(points):
        target = get_module(module, point.path)
        if point.io == "output":
            handles.append(target.register_forward_hook(lambda m, a, out, i=index: keep(i, out)))
        else:
            handles.append(target.register_forward_pre_hook(
                lambda m, a, kw, i=index: keep(i, first_input(a, kw)), with_kwargs=True))
    try:
        with contextlib.nullcontext() if grad else torch.no_grad():
            module(**inputs)
    except EarlyStopException:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [str(point) for i, point in enumerate(points) if captured.get(i) is None]
    if missing:
        raise RuntimeError(f"the forward pass never reached {', '.join(missing)}: is it part of "
                           "the model?")
    return [captured[i] for i in range(len(points))]


def collect(model: Any, encoding: dict[str, torch.Tensor], points: Sequence[HookPoint],
            keep: Keep, remote: bool = False) -> list[torch.Tensor]:
    """`tracing.collect` with PyTorch hooks: the kept token rows `[n_kept, ...]` of each hook
    point on `encoding` (sent to the model's device), the pass stopped after the last of them."""
    if remote:
        raise ValueError("PyTorch hooks read a model on this machine: remote=True needs nnsight "
                         "(tracing.collect)")
    device = next(torch_model(model).parameters()).device
    inputs = {name: value.to(device) for name, value in model_inputs(encoding).items()}
    return keep(encoding, read_with_hooks(model, points, inputs))


def collect_activations(
    model: nn.Module,
    submodule: nn.Module,
    inputs_BL: dict[str, torch.Tensor],
    use_no_grad: bool = True,
    *,
    io: str = "out",
) -> torch.Tensor:
    """The output (io="out") or input (io="in") of `submodule` when `model(**inputs_BL)` runs,
    `[batch, seq, d]` (element 0 of a tuple); the forward pass stops right after `submodule` is
    reached. use_no_grad=False keeps the autograd graph, so gradients can flow back to the model."""
    if io not in ("in", "out"):
        raise ValueError(f"io must be 'in' or 'out', got {io!r}")
    path = next((name for name, child in model.named_modules() if child is submodule), None)
    if path is None:
        raise RuntimeError(f"the forward pass never reached {type(submodule).__name__}: is it part "
                           "of the model?")
    point = HookPoint(path, hook_io(io))
    return read_with_hooks(model, [point], inputs_BL, grad=not use_no_grad)[0]


class ActivationBuffer(NNsightBuffer):
    """Iterator over `[out_batch_size, d]` batches of a Hugging Face model's activations at
    `submodule` (a torch module or dotted path), read with PyTorch hooks.

    tokenizer: by default the model's own (an nnsight-wrapped model's `tokenizer`), else loaded
    from `model.name_or_path` as upstream does. See `dictionary_learning.buffer.ActivationBuffer`
    for the other arguments, and `BufferSettings` for the settings (dtype, seed, progress, ...).
    """

    io_modes = ("in", "out")
    reader = staticmethod(collect)

    @takes_settings((*UPSTREAM_SIZES, *UPSTREAM_FILTERS),
                    ("tokenizer", "dtype", "seed", "progress"))
    def __init__(self, data: Iterable[str], model: nn.Module, submodule: nn.Module | str,
                 d_submodule: int | None = None, io: str = "out", *, settings: BufferSettings):
        if io not in self.io_modes:
            raise ValueError(f"io must be 'in' or 'out', got {io!r}")
        module = get_module(model, submodule) if isinstance(submodule, str) else submodule
        if not isinstance(module, nn.Module):
            raise TypeError("submodule must be a torch module or dotted path, got "
                            f"{type(submodule).__name__}")
        tokenizer = (settings.tokenizer if settings.tokenizer is not None
                     else getattr(model, "tokenizer", None))
        model = torch_model(model)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        settings.tokenizer = tokenizer
        named = submodule if isinstance(submodule, str) else type(module).__name__
        self._name = f"{named} {io}put"
        side = hook_io(io)
        point = HookPoint(submodule, side) if isinstance(submodule, str) else resolve_hook(
            model, module, side)
        super().__init__(data, model, point, d_submodule, io, **settings.arguments())
        self.submodule = module

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The texts tokenized (padded, truncated to ctx_len), on the model's device."""
        device = next(self.model.parameters()).device
        return {name: value.to(device) for name, value in super()._tokenize(texts).items()}

    def _where(self) -> str:
        return self._name

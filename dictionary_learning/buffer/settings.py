"""BufferSettings: how a buffer reads and holds activations, the arguments every buffer constructor
shares, declared once here with upstream's defaults and checked once; and `takes_settings`, which
gives a constructor written against `BufferSettings` upstream's flat call form.

Upstream's buffers (ActivationBuffer, NNsightActivationBuffer, HeadActivationBuffer,
pytorch_buffer's) each take these settings as separate arguments, positionally in upstream's order
or by keyword. `takes_settings` builds that signature from the dataclass (names, defaults,
annotations), so `inspect.signature` shows upstream's parameters, and turns a call into one
`BufferSettings` for the constructor's body, as `compat/trainer_api.py` does for trainers
(both through `compat.signatures.flat_signature`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import floating_dtype, integer
from ..compat.signatures import flat_signature

# upstream's positional order after (data, model, submodule, d_submodule, io): 0.1.0's, then GitHub
# HEAD's filters
UPSTREAM_SIZES = ("n_ctxs", "ctx_len", "refresh_batch_size", "out_batch_size", "device")
UPSTREAM_FILTERS = ("remove_bos", "add_special_tokens", "max_activation_norm_multiple")


@dataclass
class BufferSettings:
    """The settings every buffer shares (upstream's defaults).

    n_ctxs * ctx_len: the token vectors held (a refill tops them up when half are read); ctx_len:
    tokens per context (longer texts are truncated); refresh_batch_size: texts per model pass;
    out_batch_size: vectors per batch served; device: where they are stored. remove_bos: drop each
    context's first token (BOS, or the attention-sink first token of models without BOS).
    add_special_tokens: whether the tokenizer adds its special tokens (e.g. BOS).
    max_activation_norm_multiple: drop tokens whose norm exceeds this multiple of the median norm of
    the kept tokens of their refresh batch; None keeps all. dtype: storage dtype (None:
    the model's). seed: the shuffling seed.
    remote: run every trace through nnsight's remote execution. progress: a bar on stderr over the
    tokens of a fill that runs longer than a few seconds. tokenizer: the tokenizer of the texts
    (None: the model's).
    """

    n_ctxs: int = 30000
    ctx_len: int = 128
    refresh_batch_size: int = 512
    out_batch_size: int = 8192
    device: str | torch.device = "cpu"
    remove_bos: bool = False
    add_special_tokens: bool = True
    max_activation_norm_multiple: float | None = None
    dtype: torch.dtype | None = None
    seed: int = 0
    remote: bool = False
    progress: bool = True
    tokenizer: Any = None

    def __post_init__(self) -> None:
        """Sizes become ints (upstream's `n_ctxs=3e4` included); a clear error for what cannot be
        one."""
        for name in UPSTREAM_SIZES[:4]:
            setattr(self, name, integer(name, getattr(self, name), integral_floats=True))
        floating_dtype("dtype", self.dtype)

    def arguments(self) -> dict[str, Any]:
        """The settings as keyword arguments, for a constructor that takes them flat (a
        subclass's `super()`)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


SETTINGS = {field.name: field for field in dataclasses.fields(BufferSettings)}


def takes_settings(positional: Sequence[str],
                   keyword: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Decorate `__init__(self, <leading parameters>, settings, <own parameters>)` so that it is
    called with the settings flat, as upstream's constructors are. The flat signature: the leading
    parameters; then `positional` (names of settings or of the constructor's own parameters) in that
    order; then `keyword`, keyword-only; then the constructor's remaining own parameters. The
    settings a call gives (also through an own `**options`) build one `BufferSettings`, the rest
    keep its defaults."""

    def decorate(init: Callable) -> Callable:
        own = dict(inspect.signature(init).parameters)
        names = list(own)
        leading = [own.pop(name) for name in names[:names.index("settings")]]
        del own["settings"]
        named = {name: own.pop(name) for name in [*positional, *keyword] if name in own}
        signature = flat_signature(SETTINGS, positional, keyword, leading=leading, own=named,
                                   trailing=list(own.values()))
        options = next((p.name for p in own.values() if p.kind is inspect.Parameter.VAR_KEYWORD),
                       None)

        @functools.wraps(init)
        def __init__(*args: Any, **kwargs: Any) -> None:
            arguments = signature.bind(*args, **kwargs).arguments
            extra = arguments.pop(options, {}) if options else {}
            given = {name: source.pop(name) for source in (arguments, extra)
                     for name in list(source)
                     if name in SETTINGS}
            init(**arguments, settings=BufferSettings(**given), **extra)

        __init__.__signature__ = signature  # type: ignore[attr-defined]
        return __init__

    return decorate

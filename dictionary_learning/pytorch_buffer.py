"""An ActivationBuffer over a plain Hugging Face model with PyTorch forward hooks: upstream's `pytorch_buffer`.

No nnsight: `collect_activations` hooks one module, runs the model, and ends the forward pass with
`EarlyStopException` as soon as the module has run. `ActivationBuffer` takes upstream's arguments in upstream's order
and keeps the same vectors as `dictionary_learning.buffer.ActivationBuffer` on the same texts (left-padded batches
get the positions of their unpadded texts; padding, and with remove_bos each context's first token, are dropped).
Differences from upstream, on purpose: io="in" reads the module's input (upstream reads the output for either io),
inputs go to the model's device (upstream sends them to the storage device), the texts are used to the last one,
and `remove_bos` / the norm filter mean what they mean in `dictionary_learning.buffer`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .models import get_module, max_context, torch_model
from .progress import progress_bar
from .tracing import model_inputs, read_value, token_mask

PROBE_TEXT = "The quick brown fox."


class EarlyStopException(Exception):
    """Raised by a forward hook to end a forward pass once the activations it needs have been read."""


def collect_activations(
    model: nn.Module,
    submodule: nn.Module,
    inputs_BL: dict[str, torch.Tensor],
    use_no_grad: bool = True,
    *,
    io: str = "out",
) -> torch.Tensor:
    """The output (io="out") or input (io="in") of `submodule` when `model(**inputs_BL)` runs, `[batch, seq, d]`
    (element 0 where the module gives a tuple); the forward pass stops right after `submodule` is reached.
    use_no_grad=False keeps the autograd graph, so gradients can flow back to the model."""
    if io not in ("in", "out"):
        raise ValueError(f"io must be 'in' or 'out', got {io!r}")
    captured: list[torch.Tensor] = []

    def keep(value: Any) -> None:
        captured.append(read_value(value))
        raise EarlyStopException(f"stopped after reading {type(submodule).__name__}")

    if io == "out":
        handle = submodule.register_forward_hook(lambda module, args, output: keep(output))
    else:
        handle = submodule.register_forward_pre_hook(
            lambda module, args, kwargs: keep(args if args else next(iter(kwargs.values()), None)), with_kwargs=True)
    try:
        with torch.no_grad() if use_no_grad else contextlib.nullcontext():
            model(**inputs_BL)
    except EarlyStopException:
        pass
    finally:
        handle.remove()
    if not captured or captured[0] is None:
        raise RuntimeError(f"the forward pass never reached {type(submodule).__name__}: is it part of the model?")
    return captured[0]


class ActivationBuffer:
    """Iterator over `[out_batch_size, d]` batches of a Hugging Face model's activations at `submodule` (a torch
    module or dotted path), read with PyTorch hooks.

    tokenizer: by default the model's own (an nnsight-wrapped model's `tokenizer`), else loaded from
    `model.name_or_path` as upstream does. dtype: storage dtype (default: the model's). seed: the shuffling seed.
    progress: a bar on stderr over the tokens of a fill that runs longer than a few seconds.
    See `dictionary_learning.buffer.ActivationBuffer` for the other arguments.
    """

    def __init__(
        self,
        data: Iterable[str],
        model: nn.Module,
        submodule: nn.Module | str,
        d_submodule: int | None = None,
        io: str = "out",
        n_ctxs: int = 30000,
        ctx_len: int = 128,
        refresh_batch_size: int = 512,
        out_batch_size: int = 8192,
        device: str | torch.device = "cpu",
        remove_bos: bool = False,
        add_special_tokens: bool = True,
        max_activation_norm_multiple: float | None = None,
        *,
        tokenizer: Any = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        progress: bool = True,
    ):
        if io not in ("in", "out"):
            raise ValueError(f"io must be 'in' or 'out', got {io!r}")
        for name, value in (("n_ctxs", n_ctxs), ("ctx_len", ctx_len), ("refresh_batch_size", refresh_batch_size),
                            ("out_batch_size", out_batch_size)):
            if int(value) != value or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_activation_norm_multiple is not None and not max_activation_norm_multiple > 0:
            raise ValueError(
                f"max_activation_norm_multiple must be positive or None, got {max_activation_norm_multiple!r}")
        limit = max_context(model)
        if limit is not None and ctx_len > limit:
            raise ValueError(f"ctx_len={ctx_len} exceeds the model's maximum context of {limit} tokens")
        if tokenizer is None:
            tokenizer = getattr(model, "tokenizer", None)
        self.model = torch_model(model)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model.name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.submodule = get_module(model, submodule) if isinstance(submodule, str) else submodule
        if not isinstance(self.submodule, nn.Module):
            raise TypeError(f"submodule must be a torch module or dotted path, got {type(submodule).__name__}")
        self.io = io
        named = submodule if isinstance(submodule, str) else type(self.submodule).__name__
        self._name = f"{named} {io}put"
        self.n_ctxs, self.ctx_len = int(n_ctxs), int(ctx_len)
        self.refresh_batch_size, self.out_batch_size = int(refresh_batch_size), int(out_batch_size)
        self.device = torch.device(device)
        self.remove_bos, self.add_special_tokens = remove_bos, add_special_tokens
        self.remove_high_norm = max_activation_norm_multiple
        self.dtype = dtype or next(self.model.parameters()).dtype
        self.seed, self.progress = seed, bool(progress)
        self._generator = torch.Generator().manual_seed(seed)

        width = self._collect([PROBE_TEXT]).shape[-1]
        if d_submodule is not None and d_submodule != width:
            raise ValueError(f"d_submodule={d_submodule!r} does not match the model: the {io}put of "
                             f"{type(self.submodule).__name__} has width {width}")
        self.d_submodule = width

        self._source = iter(data)
        first = next(self._source, None)
        if not isinstance(first, str):
            raise (ValueError("data yielded no text: pass an iterable of non-empty strings") if first is None else
                   TypeError(f"data must yield strings, got {type(first).__name__}"))
        self.data: Iterator[str] = itertools.chain([first], self._source)
        self._exhausted = False
        self._store = torch.empty(0, width, dtype=self.dtype, device=self.device)
        self._pos = 0  # rows before _pos have been served

    @property
    def capacity(self) -> int:
        return self.n_ctxs * self.ctx_len

    @property
    def activation_buffer_size(self) -> int:
        """Upstream's name for `capacity`: token vectors held after a refresh."""
        return self.capacity

    @property
    def activations(self) -> torch.Tensor:
        """Every vector held since the last refresh, read or not (`read` marks the served ones)."""
        return self._store

    @property
    def read(self) -> torch.Tensor:
        """[len(activations)] bool: which held vectors have been served (a fresh tensor each time)."""
        return torch.arange(self._store.shape[0], device=self._store.device) < self._pos

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        with torch.no_grad():
            if self._store.shape[0] - self._pos < self.capacity // 2 and not self._exhausted:
                self.refresh()
            if self._pos == self._store.shape[0]:
                raise StopIteration
            batch = self._store[self._pos : self._pos + self.out_batch_size]
            self._pos += batch.shape[0]
        return batch

    def text_batch(self, batch_size: int | None = None) -> list[str]:
        """The next `batch_size` non-empty texts (fewer at the end of the data; raises StopIteration when none)."""
        batch_size = batch_size or self.refresh_batch_size
        texts = []
        for text in self.data:
            if not isinstance(text, str):
                raise TypeError(f"data must yield strings, got {type(text).__name__}")
            if text.strip():
                texts.append(text)
                if len(texts) == batch_size:
                    break
        if not texts:
            raise StopIteration("End of data stream reached")
        return texts

    def tokenized_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """The next texts tokenized (padded, truncated to ctx_len), on the model's device."""
        return self._tokenize(self.text_batch(batch_size))

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoding = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.ctx_len,
                                  add_special_tokens=self.add_special_tokens)
        model_device = next(self.model.parameters()).device
        return {"input_ids": encoding["input_ids"].to(model_device),
                "attention_mask": encoding["attention_mask"].to(model_device)}

    def _collect(self, texts: list[str]) -> torch.Tensor:
        """`[n_tokens, d]`: the kept tokens' activations on these texts."""
        encoding = self._tokenize(texts)
        values = collect_activations(self.model, self.submodule, model_inputs(encoding), io=self.io)
        mask = token_mask(encoding, self.remove_bos).to(values.device)
        if self.remove_high_norm is not None and mask.any():
            norms = values.float().norm(dim=-1)  # [batch, seq]
            mask = mask & (norms <= norms[mask].median() * self.remove_high_norm)
        return values[mask].to(device=self.device, dtype=self.dtype)

    def refresh(self) -> None:
        """Keep the unread vectors, refill to capacity from new texts, and shuffle everything."""
        parts = [self._store[self._pos:]]
        count = parts[0].shape[0]
        with progress_bar(desc=f"filling ActivationBuffer ({self._name})", total=self.capacity,
                          enabled=self.progress, unit="tok", initial=count) as bar:
            while count < self.capacity:
                try:
                    parts.append(self._collect(self.text_batch()))
                except StopIteration:
                    self._exhausted = True
                    break
                count += parts[-1].shape[0]
                bar.update(min(count, self.capacity) - bar.n)
        permutation = torch.randperm(count, generator=self._generator).to(self.device)
        self._store, self._pos = torch.cat(parts)[permutation], 0

    def close(self) -> None:
        """Stop: close the text source if it can be closed and drop the held vectors."""
        close = getattr(self._source, "close", None)
        if callable(close):
            close()
        self.data, self._exhausted = iter(()), True
        self._store, self._pos = self._store[:0], 0

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description of the buffer (upstream's keys first)."""
        return {
            "d_submodule": self.d_submodule, "io": self.io, "n_ctxs": self.n_ctxs, "ctx_len": self.ctx_len,
            "refresh_batch_size": self.refresh_batch_size, "out_batch_size": self.out_batch_size,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "remove_bos": self.remove_bos,
            "add_special_tokens": self.add_special_tokens, "max_activation_norm_multiple": self.remove_high_norm,
            "seed": self.seed,
        }

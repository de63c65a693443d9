"""ActivationBuffer: a shuffled stream of activation vectors read out of a language model with nnsight.

Compatible with upstream dictionary_learning's constructor. It holds about `n_ctxs * ctx_len` token vectors, serves
random batches of `out_batch_size` from the unread ones, and refills when fewer than half are unread: refilling
runs the model on `refresh_batch_size` texts at a time inside an nnsight trace that saves the needed module
inputs / outputs and stops right after the last of them. Padding (and, when asked, BOS) positions are dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .models import max_context, resolve_hook, torch_model
from .tracing import read_hook_points, token_mask, tokenize

IO_MODES = ("out", "in", "in_to_out")


class ActivationBuffer:
    """Iterator over batches of activations: `[out_batch_size, d]` tensors, or `(x_in, x_out)` pairs for
    io="in_to_out".

    data: an iterable of strings. model: an `nnsight.LanguageModel` (see `load_model`).
    submodule: a torch module, nnsight Envoy, dotted path ("model.layers.6.mlp") or HookPoint
      (`hook(model, 6, "mlp_out")`); for io="in_to_out" also a pair `(input_side, output_side)`, e.g.
      `(hook(model, 6, "mlp_in"), hook(model, 6, "mlp_out"))`. HookPoints carry their own input / output choice;
      modules and paths are read at their output (io="out"), input (io="in"), or input and output ("in_to_out").
    d_submodule: expected width (an int, or `(d_in, d_out)` for "in_to_out"); checked against the model.
    remove_bos: drop each context's first token (BOS, or the attention-sink first token of models without BOS).
    dtype: storage dtype (default: the model's). seed: the shuffling seed.
    """

    def __init__(
        self,
        data: Iterable[str],
        model: Any,
        submodule: Any,
        d_submodule: int | tuple[int, int] | None = None,
        io: str = "out",
        n_ctxs: int = 30000,
        ctx_len: int = 128,
        refresh_batch_size: int = 512,
        out_batch_size: int = 8192,
        device: str | torch.device = "cpu",
        remove_bos: bool = False,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ):
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
        for name, value in (("n_ctxs", n_ctxs), ("ctx_len", ctx_len), ("refresh_batch_size", refresh_batch_size),
                            ("out_batch_size", out_batch_size)):
            if int(value) != value or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        limit = max_context(model)
        if limit is not None and ctx_len > limit:
            raise ValueError(f"ctx_len={ctx_len} exceeds the model's maximum context of {limit} tokens")
        self.model = model
        self.tokenizer = model.tokenizer
        self.io = io
        self.n_ctxs, self.ctx_len = int(n_ctxs), int(ctx_len)
        self.refresh_batch_size, self.out_batch_size = int(refresh_batch_size), int(out_batch_size)
        self.device = torch.device(device)
        self.remove_bos = remove_bos
        self.dtype = dtype or next(torch_model(model).parameters()).dtype
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

        # hook points: one for "out" / "in", (input side, output side) for "in_to_out"
        if io == "in_to_out":
            if isinstance(submodule, (tuple, list)):
                if len(submodule) != 2:
                    raise ValueError(f"io='in_to_out' takes one submodule or a pair, got {len(submodule)} items")
                self.hooks = (resolve_hook(model, submodule[0], "input"), resolve_hook(model, submodule[1], "output"))
            else:
                self.hooks = (resolve_hook(model, submodule, "input"), resolve_hook(model, submodule, "output"))
        else:
            if isinstance(submodule, (tuple, list)):
                raise ValueError(f"a pair of submodules needs io='in_to_out', got io={io!r}")
            self.hooks = (resolve_hook(model, submodule, "input" if io == "in" else "output"),)
        self.submodule = submodule

        # probe the widths on a short text, and check them against d_submodule
        widths = tuple(v.shape[-1] for v in self._collect(["The quick brown fox."]))
        if d_submodule is not None:
            expected = (d_submodule,) if isinstance(d_submodule, int) else tuple(d_submodule)
            if len(expected) == 1 and len(widths) == 2:
                expected = expected * 2
            if expected != widths:
                raise ValueError(
                    f"d_submodule={d_submodule!r} does not match the model: {', '.join(map(str, self.hooks))} "
                    f"has width {widths if len(widths) > 1 else widths[0]}"
                )
        self.d_submodule: int | tuple[int, int] = widths[0] if len(widths) == 1 else widths

        # the text stream; an empty one is an error now, not a silent empty buffer later
        self._texts = iter(data)
        first = next(self._texts, None)
        if first is None:
            raise ValueError("data yielded no text: pass an iterable of non-empty strings")
        if not isinstance(first, str):
            raise TypeError(f"data must yield strings, got {type(first).__name__}")
        self._texts = itertools.chain([first], self._texts)
        self._exhausted = False

        self._acts: list[torch.Tensor] = [torch.empty(0, w, dtype=self.dtype, device=self.device) for w in widths]
        self._pos = 0  # rows before _pos have been served

    # ------------------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Token vectors held after a refresh (at least; the last refill batch may overshoot)."""
        return self.n_ctxs * self.ctx_len

    @property
    def n_unread(self) -> int:
        return self._acts[0].shape[0] - self._pos

    @property
    def activations(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The unread activations (a view)."""
        unread = [a[self._pos:] for a in self._acts]
        return unread[0] if self.io != "in_to_out" else tuple(unread)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.n_unread < self.capacity // 2 and not self._exhausted:
                self.refresh()
            if self.n_unread == 0:
                raise StopIteration
            batch = [a[self._pos : self._pos + self.out_batch_size] for a in self._acts]
            self._pos += batch[0].shape[0]
        return batch[0] if self.io != "in_to_out" else (batch[0], batch[1])

    def take(self, n_tokens: int, progress: bool = False):
        """Up to `n_tokens` vectors (fewer if the text runs out) as one tensor, or an `(x_in, x_out)` pair."""
        from tqdm import tqdm

        parts, count = [], 0
        with tqdm(total=n_tokens, desc="collecting activations", unit="tok", disable=not progress) as bar:
            while count < n_tokens:
                batch = next(self, None)
                if batch is None:
                    break
                batch = batch if isinstance(batch, tuple) else (batch,)
                batch = tuple(side[: n_tokens - count] for side in batch)
                parts.append(batch)
                count += batch[0].shape[0]
                bar.update(batch[0].shape[0])
        if not parts:
            raise ValueError("the text data is exhausted: no activations to take")
        sides = tuple(torch.cat(side) for side in zip(*parts))
        return sides if self.io == "in_to_out" else sides[0]

    # ------------------------------------------------------------------------------------------------------------
    def text_batch(self, batch_size: int | None = None) -> list[str]:
        """The next `batch_size` non-empty texts (fewer at the end of the data; raises StopIteration when none)."""
        batch_size = batch_size or self.refresh_batch_size
        texts = []
        for text in self._texts:
            if not isinstance(text, str):
                raise TypeError(f"data must yield strings, got {type(text).__name__}")
            if text.strip():
                texts.append(text)
                if len(texts) == batch_size:
                    break
        if not texts:
            raise StopIteration("the text data is exhausted")
        return texts

    def tokenized_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """The next texts tokenized as the buffer does (left padded, truncated to ctx_len)."""
        return self._tokenize(self.text_batch(batch_size))

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, self.ctx_len)

    def token_mask(self, encoding: dict[str, torch.Tensor]) -> torch.Tensor:
        """[batch, seq] bool: the positions whose activations are kept: real tokens, minus each context's first
        token if remove_bos (the BOS where the tokenizer adds one; otherwise the first token, which models without
        BOS treat as an attention sink of outlier norm)."""
        return token_mask(encoding, self.remove_bos)

    def _collect(self, texts: list[str]) -> list[torch.Tensor]:
        """Activations of the hook points on these texts: one `[n_tokens, d]` tensor per hook, padding dropped."""
        encoding = self._tokenize(texts)
        values = read_hook_points(self.model, encoding, self.hooks)
        mask = self.token_mask(encoding).to(values[0].device)
        return [value[mask].to(device=self.device, dtype=self.dtype) for value in values]

    def refresh(self) -> None:
        """Keep the unread vectors, refill to capacity from new texts, and shuffle everything."""
        parts = [[a[self._pos:]] for a in self._acts]
        count = parts[0][0].shape[0]
        while count < self.capacity:
            try:
                texts = self.text_batch()
            except StopIteration:
                self._exhausted = True
                break
            for part, values in zip(parts, self._collect(texts)):
                part.append(values)
            count += parts[0][-1].shape[0]
        permutation = torch.randperm(count, generator=self._generator).to(self.device)
        self._acts = [torch.cat(part)[permutation] for part in parts]
        self._pos = 0

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description of the buffer, saved with trained dictionaries."""
        return {
            "d_submodule": self.d_submodule,
            "io": self.io,
            "submodule": [str(h) for h in self.hooks] if len(self.hooks) > 1 else str(self.hooks[0]),
            "hooks": [{"path": h.path, "io": h.io, "name": h.name} for h in self.hooks],
            "n_ctxs": self.n_ctxs,
            "ctx_len": self.ctx_len,
            "refresh_batch_size": self.refresh_batch_size,
            "out_batch_size": self.out_batch_size,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "remove_bos": self.remove_bos,
            "seed": self.seed,
        }


def epochs(activations: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless shuffled batches over collected activations `[n, d]`, a new permutation each epoch (the last partial
    batch of each epoch is dropped)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        permutation = torch.randperm(activations.shape[0], generator=generator)
        for start in range(0, activations.shape[0] - batch_size + 1, batch_size):
            yield activations[permutation[start : start + batch_size]]

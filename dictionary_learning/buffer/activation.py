"""ActivationBuffer: a shuffled stream of activation vectors read out of a language model with
nnsight. Text batches + the collector + a `ShuffledStore`: it holds about `n_ctxs * ctx_len` token
vectors, serves random batches of `out_batch_size` from the unread ones, and refills when fewer than
half are unread, `refresh_batch_size` texts per read (`tracing.collect`: one nnsight trace, stopped
after the last hook point; `pytorch_buffer` reads with PyTorch hooks), keeping the tokens a
`TokenFilter` chooses (no padding; when asked, no BOS or outlier-norm tokens: `filtered` counts).

Upstream compatibility: the constructor takes upstream's arguments in upstream's order (0.1.0 and
GitHub HEAD: ..., `device`, `remove_bos`, `add_special_tokens`, `max_activation_norm_multiple`), the
founding README's `in_feats=`, `out_feats=`, `in_batch_size=` and its `io="in_to_out"`, and offers
upstream's `text_batch`, `tokenized_batch`, `refresh`, `config`, `activations`, `read`,
`activation_buffer_size` and `close`. Documented differences: the texts are used to the last one
(upstream drops a final partial batch, and stops while unread vectors remain), `remove_bos` drops
each context's first real token (upstream HEAD drops tokens equal to the BOS id, which removes
nothing for tokenizers that do not add one), and the norm filter's median is taken over the kept
tokens, not over padding too.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Self

import torch

from ..checks import check_memory, integer
from ..models import model_fingerprint, torch_model
from ..progress import progress_bar
from ..tracing import FilterCounts, TokenFilter, collect, tokenize
from .points import (
    IO_MODES,
    PROBE_TEXT,
    check_collection,
    check_entry_widths,
    check_given_widths,
    describe,
    entry_points,
    entry_widths,
)
from .settings import UPSTREAM_FILTERS, UPSTREAM_SIZES, BufferSettings, takes_settings
from .store import ShuffledStore


class ActivationBuffer:
    """Iterator over batches of activations: `[out_batch_size, d]` tensors, or `(x_in, x_out)` pairs
    for io="in_to_out".

    data: an iterable of strings. model: an `nnsight.LanguageModel` (see `load_model`).
    submodule: a torch module, nnsight Envoy, dotted path ("model.layers.6.mlp") or HookPoint
      (`hook(model, 6, "mlp_out")`); for io="in_to_out" also a pair `(input_side, output_side)`,
      e.g. `(hook(model, 6, "mlp_in"), hook(model, 6, "mlp_out"))`. HookPoints carry their own input
      / output choice; modules and paths are read at their output (io="out"), input (io="in"), or
      input and output ("in_to_out"). Many hook points from one model pass: a dict `{name: hook
      point, module, path or (input_side, output_side)}` (single values read as `io` says, pairs as
      in_to_out); the buffer then yields dicts `{name: batch}` (a pair `(x, y)` for pairs), all rows
      from the same tokens in the same shuffled order, and each trace stops after the last module
      any entry needs. `trainSAE` routes each trainer to the entry its config's `submodule_name`
      names.
    d_submodule: expected width (an int, or `(d_in, d_out)` for "in_to_out"; a dict of them by name
      for a dict submodule); checked against the model (None: found by a probe). The founding
      README's `in_feats` / `out_feats` (input and output widths) are checked where io reads that
      side ("out" checks out_feats and, as the founding buffer did, ignores in_feats).
    in_batch_size: the founding name of refresh_batch_size. remote: run every trace on NDIF through
      nnsight's remote execution (a model too large for this machine, loaded by nnsight without its
      weights); the activations come back to `device`. The other settings (n_ctxs, ctx_len, ...,
      dtype, seed, progress, tokenizer): `BufferSettings`.
    """

    io_modes = IO_MODES
    reader = staticmethod(collect)  # (model, encoding, points, keep, remote) -> rows per hook point

    @takes_settings((*UPSTREAM_SIZES, *UPSTREAM_FILTERS, "dtype", "seed"),
                    ("in_feats", "out_feats", "in_batch_size", "remote", "progress", "tokenizer"))
    def __init__(self, data: Iterable[str], model: Any, submodule: Any,
                 d_submodule: int | tuple[int, int] | None = None, io: str = "out", *,
                 settings: BufferSettings, in_feats: int | None = None,
                 out_feats: int | None = None, in_batch_size: int | None = None):
        if in_batch_size is not None:
            if settings.refresh_batch_size not in (512, in_batch_size):
                raise ValueError(f"in_batch_size={in_batch_size} and "
                                 f"refresh_batch_size={settings.refresh_batch_size} are one "
                                 "setting (the founding and the current name): give one of them")
            settings = dataclasses.replace(settings, refresh_batch_size=in_batch_size)
        check_collection(model, io, settings.ctx_len, settings.remove_bos,
                         settings.max_activation_norm_multiple, self.io_modes)
        if isinstance(data, (str, bytes)):
            raise TypeError("data must be an iterable of texts (e.g. a list of strings), got a "
                            "single string")
        if not isinstance(data, Iterable):
            raise TypeError("data must be an iterable of texts (e.g. a list of strings), got "
                            f"{type(data).__name__}")
        for widths in (d_submodule.values() if isinstance(d_submodule, dict) else [d_submodule]):
            for width in (widths if isinstance(widths, (tuple, list)) else (widths,)
                          if widths is not None else ()):
                integer("d_submodule", width)
        self.model, self.io = model, io
        self.n_ctxs, self.ctx_len = settings.n_ctxs, settings.ctx_len
        self.refresh_batch_size = settings.refresh_batch_size
        self.out_batch_size = settings.out_batch_size
        if self.capacity < self.out_batch_size:
            warnings.warn(f"the buffer holds n_ctxs * ctx_len = {self.capacity} tokens, fewer than "
                          f"out_batch_size={self.out_batch_size}: batches will be smaller than "
                          "asked")
        self.tokenizer = settings.tokenizer
        if self.tokenizer is None:
            self.tokenizer = getattr(model, "tokenizer", None)
        self.device = torch.device(settings.device)
        self.remove_bos, self.add_special_tokens = settings.remove_bos, settings.add_special_tokens
        self.remove_high_norm = settings.max_activation_norm_multiple  # upstream's attribute name
        self.token_filter = TokenFilter(settings.remove_bos, settings.max_activation_norm_multiple)
        self.filtered = FilterCounts()
        self.dtype = settings.dtype or next(torch_model(model).parameters()).dtype
        self.seed = settings.seed
        self.remote, self.progress = bool(settings.remote), bool(settings.progress)
        # self.hooks: the distinct hook points read, in the order given; self.entries: which of them
        # each named entry serves (None for a single submodule, which serves all of them: one
        # tensor, or an in_to_out pair)
        self.hooks, self.entries = entry_points(model, submodule, io)
        self.submodule = submodule

        # probe the widths on a short input, and check them against d_submodule / in_feats /
        # out_feats
        probe = self._collect(self._probe_encoding())
        self.widths = widths = tuple(v.shape[-1] for v in probe)  # one per hook point in self.hooks
        self.filtered = FilterCounts()  # the probe is not data
        check_memory("n_ctxs", self.n_ctxs, self.capacity * sum(widths) * self.dtype.itemsize,
                     self.device, what=f" to hold n_ctxs * ctx_len = {self.capacity:,} token "
                                       "vectors of width "
                          f"{sum(widths)}")
        self.d_submodule: Any = entry_widths(widths, self.entries)
        if self.entries is None:
            check_given_widths(widths, self.io, self.hooks, d_submodule, in_feats, out_feats)
        else:
            if in_feats is not None or out_feats is not None:
                raise ValueError("in_feats / out_feats check a single submodule; with a dict of "
                                 "hook points pass d_submodule={name: width or (d_in, d_out)}")
            check_entry_widths(d_submodule, self.d_submodule, self.entries, self.hooks)

        self._open(data)
        # one per hook
        self._store = ShuffledStore([v[:0] for v in probe], self.capacity, self.seed)
        self._closed = False
        self._served = False  # whether a batch was ever served

    @property
    def entry_names(self) -> list[str] | None:
        """The names of a dict submodule's entries (the keys of each batch), None for a single
        submodule."""
        return None if self.entries is None else list(self.entries)

    def _open(self, data: Iterable[Any]) -> None:
        """Start reading `data`; an empty one is an error now, not a silent empty buffer later."""
        self._source = iter(data)
        first = next(self._source, None)
        if first is None:
            raise ValueError("data yielded no text: pass an iterable of non-empty strings (token "
                             "sequences for NNsightActivationBuffer)")
        self._check_item(first)
        self.data: Iterator[Any] = itertools.chain([first], self._source)
        self._exhausted = False

    def _check_item(self, item: Any) -> None:
        if not isinstance(item, str):
            raise TypeError(f"data must yield strings, got {type(item).__name__}")

    # ----------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Token vectors held after a refresh (at least; the last refill batch may overshoot)."""
        return self.n_ctxs * self.ctx_len

    @property
    def activation_buffer_size(self) -> int:
        """Upstream's name for `capacity`."""
        return self.capacity

    @property
    def n_unread(self) -> int:
        return self._store.unread

    @property
    def activations(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Every vector held since the last refresh, read or not (`read` marks the served ones), as
        upstream."""
        return self._serve(self._store.rows)

    @property
    def activations_in(self) -> torch.Tensor:
        """io="in_to_out": the input side of `activations` (the founding buffer's attribute)."""
        return self._store.rows[0]

    @property
    def activations_out(self) -> torch.Tensor:
        """io="in_to_out": the output side of `activations`."""
        return self._store.rows[-1]

    @property
    def read(self) -> torch.Tensor:
        """[len(activations)] bool: which held vectors have been served (read-only: a fresh tensor
        each time)."""
        return self._store.read

    def _serve(self, sides: list[torch.Tensor]) -> Any:
        """The user-facing form of per-hook rows: one tensor, or an `(x_in, x_out)` pair; a dict of
        them by name for a dict submodule."""
        if self.entries is not None:
            return {name: sides[indices[0]] if len(indices) == 1
                    else tuple(sides[i] for i in indices)
                    for name, indices in self.entries.items()}
        return sides[0] if len(sides) == 1 else (sides[0], sides[1])

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        return self._serve(self._next_rows(self.out_batch_size))

    def _next_rows(self, n: int) -> list[torch.Tensor]:
        """The next (up to) n unread rows of every hook point, refilling first when half are
        read."""
        with torch.no_grad():
            if self._store.wants_refill and not self._exhausted:
                self.refresh()
            if self._store.unread == 0:
                if not self._served and not self._closed:  # the texts held no usable token at all
                    raise ValueError("the data yielded no activations: every text is empty or "
                                     "whitespace, or each context's tokens were all dropped "
                                     "(padding, remove_bos)")
                raise StopIteration
            self._served = True
            return self._store.take(n)

    def take(self, n_tokens: int, progress: bool = False):
        """Up to `n_tokens` vectors (fewer if the text runs out), shuffled, in the form batches
        have: one tensor, an `(x_in, x_out)` pair, or a dict of them by name. The vectors the buffer
        holds come first, then refresh batches read for what is still missing, without refilling
        the buffer: nothing is read beyond the last batch needed, whose surplus the buffer keeps for
        later batches."""
        n_tokens = integer("n_tokens", n_tokens)
        check_memory("n_tokens", n_tokens, n_tokens * sum(self.widths) * self.dtype.itemsize,
                     self.device, what=f" for {n_tokens:,} token vectors of width "
                                       f"{sum(self.widths)}")
        parts = [self._store.take(min(self._store.unread, n_tokens))]  # what the buffer holds
        count = parts[0][0].shape[0]
        with progress_bar(desc="collecting activations", total=n_tokens, enabled=progress,
                          unit="tok", initial=count) as bar, torch.no_grad():
            batches = self._batches()
            while count < n_tokens:
                rows = next(batches, None)
                if rows is None:
                    self._exhausted = True
                    break
                missing = n_tokens - count
                if rows[0].shape[0] > missing:  # the surplus stays in the buffer
                    self._store.refill([[side[missing:] for side in rows]])
                    rows = [side[:missing] for side in rows]
                parts.append(rows)
                count += rows[0].shape[0]
                bar.update(rows[0].shape[0])
        if count == 0:
            raise ValueError("the data yielded no activations: every text is empty or whitespace, "
                             "or each context's tokens were all dropped (padding, remove_bos)"
                             if not self._served else
                             "the text data is exhausted: no activations to take")
        self._served = True
        rows = [torch.cat(side) for side in zip(*parts)]
        order = self._store.permutation(count).to(rows[0].device)
        return self._serve([side[order] for side in rows])

    def close(self) -> None:
        """Stop: close the data source if it can be closed (a generator, a file), and drop the held
        vectors; the buffer then yields nothing more."""
        close = getattr(self._source, "close", None)
        if callable(close):
            close()
        self.data, self._exhausted, self._closed = iter(()), True, True
        self._store.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------
    def text_batch(self, batch_size: int | None = None) -> list[str]:
        """The next `batch_size` non-empty texts (fewer at the end of the data; raises StopIteration
        when none)."""
        return self._next_items(batch_size)

    def _next_items(self, batch_size: int | None = None) -> list[Any]:
        """The next `batch_size` (default: refresh_batch_size) usable items of the data, as
        `_usable` gives them (fewer at the end of the data; raises StopIteration when none are
        left)."""
        batch_size = batch_size or self.refresh_batch_size
        items = []
        for item in self.data:
            self._check_item(item)
            usable = self._usable(item)
            if usable is not None:
                items.append(usable)
                if len(items) == batch_size:
                    break
        if not items:
            raise StopIteration("End of data stream reached")
        return items

    def _usable(self, text: str) -> str | None:
        """A text as the buffer reads it, or None to skip it (empty or whitespace only)."""
        return text if text.strip() else None

    def tokenized_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """The next texts tokenized as the buffer does (left padded, truncated to ctx_len)."""
        return self._tokenize(self.text_batch(batch_size))

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, self.ctx_len, self.add_special_tokens)

    def _probe_encoding(self) -> dict[str, torch.Tensor]:
        return self._tokenize([PROBE_TEXT])

    def _next_encoding(self) -> dict[str, torch.Tensor] | None:
        """The model inputs of the next refresh batch, or None when the data is exhausted."""
        try:
            return self._tokenize(self.text_batch())
        except StopIteration:
            return None

    def token_mask(self, encoding: dict[str, torch.Tensor]) -> torch.Tensor:
        """[batch, seq] bool: the positions whose activations are kept, before the norm filter: real
        tokens, minus each context's first token if remove_bos (the BOS where the tokenizer adds
        one; otherwise the first token, which models without BOS treat as an attention sink)."""
        return self.token_filter.mask(encoding)

    def _transform(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-hook values `[batch, seq, ...]` as stored (subclasses reshape them); here
        unchanged."""
        return values

    def _keep(self, encoding: dict[str, torch.Tensor],
              values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The kept rows of the values as stored (the token filter sees them after `_transform`)."""
        return self.token_filter(encoding, self._transform(list(values)), self.filtered)

    def _collect(self, encoding: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Activations of the hook points on these inputs: one `[n_tokens, ...]` tensor per hook,
        padding dropped."""
        rows = self.reader(self.model, encoding, self.hooks, self._keep, remote=self.remote)
        return [side.to(device=self.device, dtype=self.dtype) for side in rows]

    def _batches(self) -> Iterator[list[torch.Tensor]]:
        """The collected rows of each next refresh batch, until the data runs out."""
        while not self._closed:
            encoding = self._next_encoding()
            if encoding is None:
                return
            yield self._collect(encoding)

    def refresh(self) -> None:
        """Keep the unread vectors, refill to capacity from new data, and shuffle everything."""
        with progress_bar(desc=self._fill_description(), total=self.capacity, enabled=self.progress,
                          unit="tok", initial=self._store.unread) as bar:
            if self._store.refill(self._batches(), bar):
                self._exhausted = True

    def _where(self) -> str:
        """The hook points read, as the fill's bar names them."""
        names = [str(h) for h in self.hooks]
        return ", ".join(names) if len(names) <= 2 else f"{names[0]}, ... ({len(names)} points)"

    def _fill_description(self) -> str:
        """The fill's bar title, e.g. "filling ActivationBuffer (layers.6.resid)"."""
        fill = "refilling" if self._served else "filling"
        return f"{fill} {type(self).__name__} ({self._where()})"

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description of the buffer, saved with trained dictionaries (upstream's
        keys first)."""
        return {
            "d_submodule": self.d_submodule,
            "io": self.io,
            "n_ctxs": self.n_ctxs,
            "ctx_len": self.ctx_len,
            "refresh_batch_size": self.refresh_batch_size,
            "out_batch_size": self.out_batch_size,
            "device": str(self.device),
            "submodule": describe(self.hooks, self.entries),
            "hooks": [{"path": h.path, "io": h.io, "name": h.name} for h in self.hooks],
            "dtype": str(self.dtype).removeprefix("torch."),
            "remove_bos": self.remove_bos,
            "add_special_tokens": self.add_special_tokens,
            "max_activation_norm_multiple": self.remove_high_norm,
            "filtered": self.filtered.summary(),
            "seed": self.seed,
            "model_fingerprint": model_fingerprint(self.model),
        }

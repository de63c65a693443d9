"""Reading a cache: `ActivationCache`, shuffled batches with bounded memory, deterministic and
resumable."""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checks import floating_dtype, integer
from ..files import inside
from .manifest import SAFETENSORS_DTYPES, hook_key, open_shard, read_manifest


def _generator(*keys: int) -> torch.Generator:
    """A torch generator seeded by a hash of integer keys (seed, epoch, window): independent streams
    per key."""
    digest = hashlib.sha256(",".join(map(str, keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class ActivationCache:
    """Iterator over shuffled batches of a cache written by `write_cache`: `[batch_size, d]`
    tensors, `(x, y)` pairs (io="in_to_out"), or dicts by name (a dict submodule), as
    ActivationBuffer yields them.

    entries: for a dict cache, a list of names (batches are dicts of those) or one name (batches are
      that entry's tensor or pair); None: all. epochs: passes over the cache (None: endless); each
      drops its last partial batch.
    start_batch: begin at this batch index (counted over epochs), exactly as if that many had been
      drawn, without reading the skipped windows. rank / world_size: data-parallel training: global
      batch i has batch_size * world_size rows and rank r gets rows [r * batch_size, (r + 1) *
      batch_size) of it.
    window_shards: shards shuffled together; memory holds at most one window of rows (see the
      module docstring).
    device / dtype: where and in what dtype batches are served (default: the cache's dtype).
    """

    def __init__(self, path: str | Path, batch_size: int, seed: int = 0,
                 entries: str | list[str] | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, epochs: int | None = 1, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, window_shards: int = 4):
        self.path = Path(path)
        self.manifest = manifest = read_manifest(self.path)
        self.batch_size, self.window_shards = (integer("batch_size", batch_size),
                                               integer("window_shards", window_shards))
        self.world_size = integer("world_size", world_size)
        self.rank = integer("rank", rank, low=0, high=self.world_size - 1,
                            high_name="world_size - 1")
        self.start_batch = integer("start_batch", start_batch, low=0)
        self.epochs = None if epochs is None else integer("epochs", epochs)
        self.seed, self.device = int(seed), torch.device(device)
        self.stored_dtype = getattr(torch, manifest["dtype"])
        self.dtype = floating_dtype("dtype", dtype) or self.stored_dtype
        self.shards = [(inside(self.path, shard["file"], "a shard file of the manifest"),
                        int(shard["tokens"]))
                       for shard in manifest["shards"]]
        self.n_tokens = sum(tokens for _, tokens in self.shards)
        all_entries = manifest["entries"]
        if all_entries is None:
            if entries is not None:
                hook = manifest["hooks"][0]
                raise ValueError(f"entries={entries!r} selects names, but this cache holds one "
                                 f"submodule ({hook['name'] or hook['path']}), not a dict")
            self.entries, self._single = None, tuple(range(len(manifest["hooks"])))
        else:
            names = ([entries] if isinstance(entries, str)
                     else list(all_entries) if entries is None else list(entries))
            unknown = [name for name in names if name not in all_entries]
            if unknown or not names:
                raise ValueError(f"entries {unknown or names} are not in this cache; its entries: "
                                 f"{list(all_entries)}")
            self.entries = {name: tuple(all_entries[name]) for name in names}
            self._single = self.entries[entries] if isinstance(entries, str) else None
        self.selection = entries
        self.hook_indices = sorted({i for indices in (self.entries or {0: self._single}).values()
                                    for i in indices})
        self._check_shards()
        self.global_batch = self.batch_size * self.world_size
        if self.global_batch > self.n_tokens:
            raise ValueError(f"batch_size * world_size = {self.global_batch} exceeds the cache's "
                             f"{self.n_tokens} tokens: no full batch to serve")
        # the most rows (per hook point) held at once so far: the memory bound, observable
        self.peak_rows = 0
        self._stream: Iterator[Any] | None = None
        self._window: dict[int, torch.Tensor] | None = None  # the buffer windows are read into

    def _check_shards(self) -> None:
        """Every shard exists, opens, and holds each hook point's tensor in the manifest's shape and
        dtype."""
        widths, dtype = self.manifest["widths"], SAFETENSORS_DTYPES[self.manifest["dtype"]]
        for file, tokens in self.shards:
            with open_shard(file) as handle:
                for i, width in enumerate(widths):
                    if hook_key(i) not in handle.keys():
                        raise ValueError(f"shard {str(file)!r} lacks the tensor {hook_key(i)!r} "
                                         f"(hook point {self.manifest['hooks'][i]['path']})")
                    tensor = handle.get_slice(hook_key(i))
                    if list(tensor.get_shape()) != [tokens, width] or tensor.get_dtype() != dtype:
                        raise ValueError(f"shard {str(file)!r} holds {hook_key(i)} of shape "
                                         f"{tensor.get_shape()} and dtype {tensor.get_dtype()}; "
                                         f"the manifest expects [{tokens}, {width}] and {dtype}")

    @property
    def entry_names(self) -> list[str] | None:
        """The names of the entries served (the keys of each batch), None when batches are not
        dicts."""
        return None if self.entries is None or self._single is not None else list(self.entries)

    @property
    def d_submodule(self) -> Any:
        widths = self.manifest["widths"]

        def width(indices: tuple[int, ...]) -> Any:
            return widths[indices[0]] if len(indices) == 1 else tuple(widths[i] for i in indices)

        if self._single is not None:
            return width(self._single)
        return {name: width(indices) for name, indices in self.entries.items()}

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.n_tokens // self.global_batch

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description, saved with dictionaries trained on this cache (the
        buffer's keys first)."""
        m = self.manifest
        return {
            "d_submodule": self.d_submodule, "io": m["io"], "ctx_len": m["ctx_len"],
            "out_batch_size": self.batch_size, "device": str(self.device), "hooks": m["hooks"],
            "dtype": str(self.dtype).removeprefix("torch."), "remove_bos": m["remove_bos"],
            "add_special_tokens": m["add_special_tokens"],
            "max_activation_norm_multiple": m["max_activation_norm_multiple"], "seed": self.seed,
            "cache": str(self.path), "model": m["model"],
            "model_fingerprint": m.get("model_fingerprint"), "source": m["source"],
            "cache_dtype": m["dtype"], "n_tokens": self.n_tokens, "n_shards": len(self.shards),
            "shard_tokens": m["shard_tokens"], "entries": self.selection,
            "window_shards": self.window_shards, "epochs": self.epochs,
            "start_batch": self.start_batch, "rank": self.rank, "world_size": self.world_size,
        }

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        # through a weak proxy: no reference cycle keeps a dropped reader's window alive
        if self._stream is None:
            self._stream = type(self)._batches(weakref.proxy(self))
        return next(self._stream)

    def _serve(self, rows: dict[int, torch.Tensor]) -> Any:
        rows = {i: r.to(device=self.device, dtype=self.dtype) for i, r in rows.items()}
        if self._single is not None:
            return (rows[self._single[0]] if len(self._single) == 1
                    else tuple(rows[i] for i in self._single))
        return {name: rows[indices[0]] if len(indices) == 1 else tuple(rows[i] for i in indices)
                for name, indices in self.entries.items()}

    def _batches(self) -> Iterator[Any]:
        per_epoch, n = len(self), self.start_batch
        while self.epochs is None or n < self.epochs * per_epoch:
            epoch, index = divmod(n, per_epoch)
            # self stays the proxy
            for batch in self.__class__._epoch(self, epoch, index * self.global_batch):
                yield batch
                n += 1

    def windows(self, epoch: int) -> list[list[int]]:
        """The shard indices of each window of an epoch, in serving order."""
        order = torch.randperm(len(self.shards), generator=_generator(self.seed, epoch)).tolist()
        return [order[i : i + self.window_shards] for i in range(0, len(order), self.window_shards)]

    def _epoch(self, epoch: int, skip: int) -> Iterator[Any]:
        """One epoch's batches from its `skip`-th row on (a multiple of the global batch). A window
        is held in shard order; each batch is gathered from it through the window's permutation (a
        fresh tensor, which keeps no window alive), and only this rank's rows of it."""
        size, low, high = (self.global_batch, self.rank * self.batch_size,
                           (self.rank + 1) * self.batch_size)
        # rows of a batch that began in the previous window
        carry: dict[int, torch.Tensor] | None = None
        for w, window in enumerate(self.windows(epoch)):
            rows_in_window = sum(self.shards[s][1] for s in window)
            if skip >= rows_in_window:  # wholly before start_batch: never read
                skip -= rows_in_window
                continue
            rows, order = self._read_window(epoch, w, window, carry)
            order, skip, start = order[skip:], 0, 0
            if carry is not None:
                need = size - carry[self.hook_indices[0]].shape[0]
                if len(order) < need:
                    carry = {i: torch.cat([carry[i], r[order]]) for i, r in rows.items()}
                    continue
                yield self._serve({i: torch.cat([carry[i], r[order[:need]]])[low:high]
                                   for i, r in rows.items()})
                start = need
            while start + size <= len(order):
                yield self._serve({i: r[order[start + low : start + high]]
                                   for i, r in rows.items()})
                start += size
            carry = {i: r[order[start:]] for i, r in rows.items()} if start < len(order) else None
            del rows

    def _read_window(self, epoch: int, w: int, window: list[int], carry: dict | None
                     ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """The rows of the window's shards, concatenated (one tensor per hook point needed, each
        shard copied in by one sequential read of its memory map), and the order to serve them in: a
        permutation seeded by (seed, epoch, window)."""
        total = sum(self.shards[s][1] for s in window)
        carried = 0 if carry is None else carry[self.hook_indices[0]].shape[0]
        self.peak_rows = max(self.peak_rows, total + carried)
        # allocated once and reused: a fresh one per window would page-fault it in again
        if self._window is None:
            largest = sum(sorted((tokens for _, tokens in self.shards),
                                 reverse=True)[: self.window_shards])
            self._window = {i: torch.empty(largest, self.manifest["widths"][i],
                                           dtype=self.stored_dtype)
                            for i in self.hook_indices}
        rows = {i: buffer[:total] for i, buffer in self._window.items()}
        offset = 0
        for s in window:
            file, tokens = self.shards[s]
            with open_shard(file) as handle:
                for i in self.hook_indices:
                    rows[i][offset : offset + tokens] = handle.get_tensor(hook_key(i))
            offset += tokens
        return rows, torch.randperm(total, generator=_generator(self.seed, epoch, w))

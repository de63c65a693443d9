"""ShuffledStore: the rows a buffer holds, one tensor per hook point, served in a random order.

A buffer refills its store when fewer than half of its rows are unread: the unread rows are kept,
new rows are appended until the store holds `capacity` (the last batch may overshoot), and all of
them are permuted by the store's own seeded generator: the same seed and rows give the same order.
`Epochs` serves activations already collected, a new permutation each epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class ShuffledStore:
    """Aligned rows of one or more tensors (`empty`: one `[0, ...]` tensor per hook point, on the
    store's device and in its dtype); the rows before `position` have been served."""

    def __init__(self, empty: list[torch.Tensor], capacity: int, seed: int):
        self.rows, self.capacity, self.position = empty, capacity, 0
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def unread(self) -> int:
        return self.rows[0].shape[0] - self.position

    @property
    def wants_refill(self) -> bool:
        return self.unread < self.capacity // 2

    @property
    def read(self) -> torch.Tensor:
        """`[len(rows)]` bool: which held rows have been served (a fresh tensor each time)."""
        return torch.arange(self.rows[0].shape[0], device=self.rows[0].device) < self.position

    def refill(self, batches: Iterable[list[torch.Tensor]], bar: Any = None) -> bool:
        """Keep the unread rows, append `batches` (rows per hook point) until `capacity`, and
        shuffle; returns whether `batches` ran out first. `bar`, a progress bar, counts the rows."""
        parts = [[rows[self.position:]] for rows in self.rows]
        count, exhausted = parts[0][0].shape[0], False
        batches = iter(batches)
        while count < self.capacity:
            batch = next(batches, None)
            if batch is None:
                exhausted = True
                break
            for part, rows in zip(parts, batch):
                part.append(rows)
            count += batch[0].shape[0]
            if bar is not None:
                bar.update(min(count, self.capacity) - bar.n)
        permutation = self.permutation(count).to(parts[0][0].device)
        self.rows, self.position = [torch.cat(part)[permutation] for part in parts], 0
        return exhausted

    def permutation(self, n: int) -> torch.Tensor:
        """A random order of n rows from the store's generator (on the CPU)."""
        return torch.randperm(n, generator=self._generator)

    def take(self, n: int) -> list[torch.Tensor]:
        """The next (up to) n unread rows of every hook point."""
        rows = [side[self.position : self.position + n] for side in self.rows]
        self.position += rows[0].shape[0]
        return rows

    def clear(self) -> None:
        """Drop every row held."""
        self.rows, self.position = [side[:0] for side in self.rows], 0


class Epochs:
    """Endless shuffled batches over collected activations `[n, d]`, a new permutation each epoch
    (the last partial batch of each epoch is dropped). `config` describes where the activations came
    from (e.g. the collecting buffer's config): trainSAE saves it with the dictionaries trained on
    them, hook points included."""

    def __init__(self, activations: torch.Tensor, batch_size: int, seed: int = 0,
                 config: dict[str, Any] | None = None):
        n = activations.shape[0]
        if (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                or not 0 < batch_size <= n):
            raise ValueError(f"batch_size must be an int in [1, {n}] (the number of collected "
                             "activations), got "
                             f"{batch_size!r}")  # more would never yield: an endless loop
        self.activations, self.batch_size = activations, batch_size
        self.config = {**(config or {}),
                       "epochs": {"n_tokens": n, "batch_size": batch_size, "seed": seed}}
        self._generator = torch.Generator().manual_seed(seed)
        # a new epoch at the first batch
        self._permutation, self._start = torch.empty(0, dtype=torch.long), n

    def __iter__(self) -> Epochs:
        return self

    def __next__(self) -> torch.Tensor:
        n = self.activations.shape[0]
        if self._start + self.batch_size > n:
            self._permutation, self._start = torch.randperm(n, generator=self._generator), 0
        rows = self._permutation[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        return self.activations[rows]


def epochs(activations: torch.Tensor, batch_size: int, seed: int = 0,
           config: dict[str, Any] | None = None) -> Epochs:
    """`Epochs(activations, batch_size, seed, config)`: endless shuffled batches over collected
    activations."""
    return Epochs(activations, batch_size, seed, config)

"""Progress on stderr for every phase that can take long: `progress_bar` (the one tqdm set-up of the
package) and `phase` (a line as a pipeline's phase starts, and its seconds).

A bar appears only once its phase has run `DELAY` seconds, so a function called in a loop on small
inputs (e.g. `evaluate` per batch of a sweep) stays quiet, while a long call (a large buffer's first
fill) never looks hung. `DELAY = 0` (as tests set it) shows every bar at once. This module imports
nothing of the package.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

DELAY = 2.0  # seconds a phase runs before its bar appears


def progress_bar(iterable: Iterable[Any] | None = None, desc: str = "", total: float | None = None,
                 enabled: bool = True, unit: str = "it", **options: Any) -> tqdm:
    """A tqdm bar on stderr titled `desc` (give `total` where known, for an ETA), shown after DELAY
    seconds, never unless `enabled`. Iterate it, or use it as a context manager with `update(n)`.
    Nested bars (a buffer refill inside a training run) are cleared when done; others stay."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    options.setdefault("delay", DELAY)
    options.setdefault("leave", None)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, **options)


class Phase:
    """A timed phase: the `seconds` it took (so far, while it runs)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ended: float | None = None

    @property
    def seconds(self) -> float:
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started


@contextmanager
def phase(message: str, enabled: bool = True) -> Iterator[Phase]:
    """Print `message` on stderr as a phase starts (when `enabled`) and time it: `with phase(...) as
    p:`, then `p.seconds`. A pipeline prints one per phase, so no wait is long without a word."""
    if enabled:
        print(message, file=sys.stderr, flush=True)
    timer = Phase()
    try:
        yield timer
    finally:
        timer.ended = time.perf_counter()

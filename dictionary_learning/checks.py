"""Argument checks shared by every room: a clear error naming the parameter, what was expected and what came.

Imports nothing of the package, so every room may use it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def integer(name: str, value: Any, low: int = 1, high: int | None = None, integral_floats: bool = False,
            high_name: str | None = None) -> int:
    """`value` as an int in [low, high] (high None: no upper bound). Integral numbers of any kind (numpy or 0-d
    torch integers; with `integral_floats` also floats such as upstream's `n_ctxs=3e4`) are accepted; booleans,
    fractions, NaN, None and strings are refused with a ValueError naming `name` (and the upper bound as
    `high_name=high` when given)."""
    number = None
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            if integral_floats and isinstance(value, float) and math.isfinite(value) and value == int(value):
                number = int(value)
    if number is None or number < low or (high is not None and number > high):
        bounds = "a positive int" if (low, high) == (1, None) else (
            f"an int >= {low}" if high is None else f"an int in [{low}, {high_name + '=' if high_name else ''}{high}]")
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return number


def floating_dtype(name: str, dtype: Any, allow_none: bool = True) -> torch.dtype | None:
    """A floating-point torch.dtype (or None where allowed), else a TypeError naming `name`."""
    if dtype is None and allow_none:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype such as torch.float32, got {dtype!r}")
    return dtype


def texts(name: str, value: Any) -> Iterator[str]:
    """An iterator over the strings of `value` (an iterable of texts), checking each as it comes: a single string
    (which would be read character by character), a non-iterable or a non-string item is a TypeError naming `name`."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an iterable of texts (e.g. a list of strings), got a single string")
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be an iterable of texts (e.g. a list of strings), got {type(value).__name__}")

    def checked() -> Iterator[str]:
        for item in value:
            if not isinstance(item, str):
                raise TypeError(f"{name} must yield strings, got {type(item).__name__}")
            yield item

    return checked()

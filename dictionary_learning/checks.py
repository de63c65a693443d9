"""Argument checks shared by every room: a clear error naming the parameter, what was expected and
what came.

Imports nothing of the package, so every room may use it.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def integer(name: str, value: Any, low: int = 1, high: int | None = None,
            integral_floats: bool = False, high_name: str | None = None) -> int:
    """`value` as an int in [low, high] (high None: no upper bound). Integral numbers of any kind
    (numpy or 0-d torch integers; with `integral_floats` also floats such as upstream's
    `n_ctxs=3e4`) are accepted; booleans, fractions, NaN, None and strings are refused with a
    ValueError naming `name` (and the upper bound as `high_name=high` when given)."""
    number = None
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            if (integral_floats and isinstance(value, float) and math.isfinite(value)
                    and value == int(value)):
                number = int(value)
    if number is None or number < low or (high is not None and number > high):
        bounds = "a positive int" if (low, high) == (1, None) else (
            f"an int >= {low}" if high is None
            else f"an int in [{low}, {high_name + '=' if high_name else ''}{high}]")
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return number


def floating_dtype(name: str, dtype: Any, allow_none: bool = True) -> torch.dtype | None:
    """A floating-point torch.dtype (or None where allowed), else a TypeError naming `name`."""
    if dtype is None and allow_none:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype such as torch.float32, got "
                        f"{dtype!r}")
    return dtype


def texts(name: str, value: Any) -> Iterator[str]:
    """An iterator over the strings of `value` (an iterable of texts), checking each as it comes: a
    single string (which would be read character by character), a non-iterable or a non-string item
    is a TypeError naming `name`."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an iterable of texts (e.g. a list of strings), got a "
                        "single string")
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be an iterable of texts (e.g. a list of strings), got "
                        f"{type(value).__name__}")

    def checked() -> Iterator[str]:
        for item in value:
            if not isinstance(item, str):
                raise TypeError(f"{name} must yield strings, got {type(item).__name__}")
            yield item

    return checked()


def _size(n_bytes: float) -> str:
    for unit, scale in (("PB", 2 ** 50), ("TB", 2 ** 40), ("GB", 2 ** 30), ("MB", 2 ** 20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes:,.0f} bytes"


def memory_size(device: Any = "cpu") -> int | None:
    """The memory of `device`: a GPU's, or this machine's physical memory (None where it cannot be
    told)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(name: str, value: Any, n_bytes: float, device: Any = "cpu",
                 what: str = "") -> None:
    """Refuse before any work a size whose memory alone (`n_bytes`, an estimate) exceeds the
    device's memory, with the estimate in the message: such a run could only fill memory and die."""
    total = memory_size(device)
    if total is not None and n_bytes > total:
        where = ("this machine's memory" if torch.device(device).type == "cpu"
                 else f"{device}'s memory")
        raise ValueError(f"{name}={value!r} needs about {_size(n_bytes)} of memory{what}, more "
                         f"than the {_size(total)} of {where}: ask for less")


def check_disk(folder: Any, n_bytes: float, name: str) -> None:
    """Refuse before any work a write of about `n_bytes` into `folder` that the free disk space
    cannot hold."""
    import shutil
    from pathlib import Path

    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if n_bytes > free:
        raise ValueError(f"{name} asks for about {_size(n_bytes)} on disk in {str(folder)!r}, more "
                         f"than the {_size(free)} free there: ask for less, or write elsewhere")


def finite_hyperparameters(owner: str, values: dict[str, Any]) -> None:
    """Refuse NaN / inf hyperparameters (floats, or lists of them) and a learning rate that is not a
    finite number >= 0, naming the key: a run given one trains on and saves NaN weights."""
    for key, value in values.items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"{owner}: {key} must be a finite "
                             f"number{'s' if numbers is value else ''}, got {value!r}")
    lr = values.get("lr")
    if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool)
                               and math.isfinite(lr)
                               and lr >= 0):
        raise ValueError(f"{owner}: lr must be a finite number >= 0, got {lr!r}")


def options(config_class: type, config: Any, given: dict[str, Any], owner: str) -> Any:
    """The options of a call that takes `config: config_class | None = None, **options`: `config`
    with the keyword `given` fields replaced, or a new `config_class(**given)`. An unknown name is a
    TypeError naming `owner` and the accepted names, a missing required one names it; a config of
    another class is refused."""
    import dataclasses

    fields = dataclasses.fields(config_class)
    split_options(given, [[field.name for field in fields]], owner)
    if config is None:
        missing = [field.name for field in fields
                   if field.name not in given and field.default is dataclasses.MISSING
                   and field.default_factory is dataclasses.MISSING]
        if missing:
            raise TypeError(f"{owner} is missing {len(missing)} required argument(s): "
                            f"{', '.join(repr(name) for name in missing)}")
        return config_class(**given)
    if not isinstance(config, config_class):
        raise TypeError(f"{owner}'s config must be a {config_class.__name__}, got "
                        f"{type(config).__name__}")
    return dataclasses.replace(config, **given) if given else config


def split_options(given: dict[str, Any], groups: list[list[str]], owner: str
                  ) -> list[dict[str, Any]]:
    """The keyword options `given` split among `groups` of accepted names (each name to the first
    group holding it), for a call whose options belong to several configs; an unknown name is a
    TypeError naming `owner` and every accepted name."""
    accepted = [name for group in groups for name in group]
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        hints = "".join(f"; {old} was renamed {new}" for old in unknown
                        for new in RENAMED.get(old, ()) if new in accepted)
        raise TypeError(f"{owner} got unexpected keyword argument(s) {unknown}{hints}; accepted: "
                        f"{accepted}")
    parts: list[dict[str, Any]] = [{} for _ in groups]
    for name, value in given.items():
        parts[next(i for i, group in enumerate(groups) if name in group)][name] = value
    return parts


# keyword names this package renamed, to their new names (one vocabulary: widths d_in / d_sae /
# d_out; "source" for what feeds a feature, "upstream" only for Marks' dictionary_learning)
RENAMED = {"dict_size": ("d_sae",), "upstream": ("source", "sources")}


def renamed_keywords(**renamed: str) -> Callable[[Callable], Callable]:
    """Decorator: a call that passes an old keyword name (`old="new"`) fails with a TypeError naming
    the new one, instead of Python's bare "unexpected keyword argument"."""
    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            old = [name for name in renamed if name in kwargs]
            if old:
                raise TypeError(f"{function.__qualname__}() got the old keyword argument(s) "
                                f"{old}: " + "; ".join(f"{name} was renamed {renamed[name]}"
                                                        for name in old))
            return function(*args, **kwargs)
        return call
    return decorate

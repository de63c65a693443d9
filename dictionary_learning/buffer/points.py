"""Which hook points a buffer or a cache reads: one submodule (a hook point, module, Envoy or path,
read as `io` says; with io="in_to_out" a module's input and output, or an (input side, output side)
pair), or a dict of them by name, all read from one model pass (`entry_points`); and the settings
every collection checks before it reads (`check_collection`)."""

from __future__ import annotations

from typing import Any

from ..models import BUFFER_IO, HookPoint, max_context, submodule_points

IO_MODES = BUFFER_IO  # the buffer's io values (models.hooks holds their translation)
PROBE_TEXT = "The quick brown fox."  # read once to learn the hook points' widths


def check_collection(model: Any, io: str, ctx_len: int, remove_bos: bool,
                     max_norm_multiple: float | None, io_modes: tuple[str, ...] = IO_MODES) -> None:
    """Clear errors for collection settings that cannot work, before any trace runs."""
    if io not in io_modes:
        raise ValueError(f"io must be one of {io_modes}, got {io!r}")
    if max_norm_multiple is not None and not max_norm_multiple > 0:
        raise ValueError("max_activation_norm_multiple must be positive or None, got "
                         f"{max_norm_multiple!r}")
    if remove_bos and ctx_len == 1:
        raise ValueError("ctx_len=1 with remove_bos=True keeps no token: each context's only token "
                         "is dropped")
    limit = max_context(model)
    if limit is not None and ctx_len > limit:
        raise ValueError(f"ctx_len={ctx_len} exceeds the model's maximum context of {limit} tokens")


def entry_points(model: Any, submodule: Any, io: str
                 ) -> tuple[tuple[HookPoint, ...], dict[str, tuple[int, ...]] | None]:
    """(the distinct hook points to read, in the order given; which of them each named entry serves,
    or None for a single submodule, which serves all of them). In a dict, single values are read as
    `io` says and pairs as in_to_out; a hook point two entries share is read and stored once."""
    if not isinstance(submodule, dict):
        return submodule_points(model, submodule, io), None
    if not submodule:
        raise ValueError("submodule is an empty dict: name at least one hook point")
    points: list[HookPoint] = []
    keys: list[tuple[str, str]] = []
    entries: dict[str, tuple[int, ...]] = {}
    for name, spec in submodule.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"the names of a dict submodule are non-empty strings, got {name!r}")
        try:
            sides = submodule_points(model, spec,
                                     "in_to_out" if isinstance(spec, (tuple, list)) else io)
        except (TypeError, ValueError) as error:
            raise type(error)(f"submodule[{name!r}]: {error}") from error
        for point in sides:
            if (point.path, point.io) not in keys:
                points.append(point)
                keys.append((point.path, point.io))
        entries[name] = tuple(keys.index((point.path, point.io)) for point in sides)
    return tuple(points), entries


def entry_width(widths: tuple[int, ...], indices: tuple[int, ...]) -> Any:
    """An entry's width: one int, or (d_in, d_out) for a pair."""
    return widths[indices[0]] if len(indices) == 1 else tuple(widths[i] for i in indices)


def entry_widths(widths: tuple[int, ...], entries: dict[str, tuple[int, ...]] | None) -> Any:
    """`d_submodule` from the hook points' widths: an int, (d_in, d_out), or a dict by name."""
    if entries is None:
        return entry_width(widths, tuple(range(len(widths))))
    return {name: entry_width(widths, indices) for name, indices in entries.items()}


def check_entry_widths(d_submodule: Any, actual: dict[str, Any],
                       entries: dict[str, tuple[int, ...]], hooks: tuple[HookPoint, ...]) -> None:
    """A clear error unless the expected widths `d_submodule` (a dict by name, or None) match the
    `actual` ones."""
    if d_submodule is None:
        return
    if not isinstance(d_submodule, dict):
        raise TypeError("with a dict of hook points, d_submodule is a dict {name: width} too, got "
                        f"{d_submodule!r}")
    unknown = sorted(set(d_submodule) - set(entries))
    if unknown:
        raise ValueError(f"d_submodule names {unknown}, which are not hook points of this buffer: "
                         f"{sorted(entries)}")
    for name, expected in d_submodule.items():
        if (tuple(expected) if isinstance(expected, (tuple, list)) else expected) != actual[name]:
            raise ValueError(f"d_submodule[{name!r}]={expected!r} does not match the model: "
                             f"{', '.join(str(hooks[i]) for i in entries[name])} has width "
                             f"{actual[name]}")


def describe(hooks: tuple[HookPoint, ...], entries: dict[str, tuple[int, ...]] | None) -> Any:
    """The hook points as text for a config: one name, a list of two, or a dict of them by entry."""
    def text(indices: Any) -> Any:
        names = [str(hooks[i]) for i in indices]
        return names[0] if len(names) == 1 else names

    if entries is not None:
        return {name: text(indices) for name, indices in entries.items()}
    return text(range(len(hooks)))


def check_given_widths(widths: tuple, io: str, hooks: Any, d_submodule: Any, in_feats: int | None,
                       out_feats: int | None) -> None:
    """The widths a buffer was told (`d_submodule`, the founding README's `in_feats` / `out_feats`)
    against the model's `widths`: a clear error naming the hook points on a mismatch."""
    given = []
    if d_submodule is not None:
        expected = (d_submodule,) if isinstance(d_submodule, int) else tuple(d_submodule)
        given.append((f"d_submodule={d_submodule!r}",
                      expected * 2 if len(expected) < len(widths) else expected))
    if in_feats is not None or out_feats is not None:
        # the founding README: "in" is checked against in_feats, "out" against out_feats,
        # "in_to_out" both
        sides = {"in": (in_feats,), "out": (out_feats,),
                 "in_to_out": (in_feats, out_feats)}.get(io)
        if sides is not None and any(side is not None for side in sides):
            named = ", ".join(f"{n}={v}"
                              for n, v in (("in_feats", in_feats), ("out_feats", out_feats))
                              if v is not None)
            given.append((named, sides))
    for name, expected in given:
        if len(expected) != len(widths) or any(e is not None and e != w
                                               for e, w in zip(expected, widths)):
            raise ValueError(
                f"{name} does not match the model: {', '.join(map(str, hooks))} "
                f"has width {widths if len(widths) > 1 else widths[0]}"
            )

"""Upstream's flat constructor signatures, built from a config dataclass: `flat_signature` lays out
the leading parameters, then names taken positionally in upstream's order, then keyword-only names,
then any trailing parameters, each name being a dataclass field (its default and annotation) or one
of the function's own parameters. The trainers' (`trainer_api.py`) and the buffers'
(`buffer/settings.py`) flat constructors are built with it."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
KEYWORD = inspect.Parameter.KEYWORD_ONLY


def flat_signature(fields: Mapping[str, dataclasses.Field], positional: Sequence[str],
                   keyword: Sequence[str] = (), leading: Sequence[inspect.Parameter] = (),
                   trailing: Sequence[inspect.Parameter] = (),
                   own: Mapping[str, inspect.Parameter] | None = None,
                   defaults: Mapping[str, Any] | None = None) -> inspect.Signature:
    """`leading`, then `positional` (positional-or-keyword), then `keyword` (keyword-only), then
    `trailing`. A name is one of `own` (its parameter, with the kind changed) or a field of `fields`
    (its default, or the one `defaults` gives, and its annotation)."""
    own, defaults = own or {}, defaults or {}

    def parameter(name: str, kind: inspect._ParameterKind) -> inspect.Parameter:
        if name in own:
            return own[name].replace(kind=kind)
        field = fields[name]
        value = defaults.get(name, inspect.Parameter.empty if field.default is dataclasses.MISSING
                             else field.default)
        return inspect.Parameter(name, kind, default=value, annotation=field.type)

    return inspect.Signature([*leading, *(parameter(name, POSITIONAL) for name in positional),
                              *(parameter(name, KEYWORD) for name in keyword), *trailing])

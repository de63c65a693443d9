"""Dictionaries, one room per family, all on the `Dictionary` base (`base.py`):

- `relu.py`: `AutoEncoder` (ReLU SAE), `AutoEncoderNew`, `IdentityDict`
- `topk.py`: `AutoEncoderTopK`, `BatchTopKSAE` (sparse training path)
- `gated.py`: `GatedAutoEncoder`; `jumprelu.py`: `JumpReluAutoEncoder`; `matryoshka.py`:
  `MatryoshkaBatchTopKSAE`

Parameter names and `ae.pt` state dicts follow upstream dictionary_learning, so upstream checkpoints
load here and ours load there. A transcoder maps an input of width `activation_dim` to an output of
width `output_dim` (default: the same): its encoder reads the raw input (no `b_dec` is subtracted,
since that bias lives in output space) and an optional linear skip adds `W_skip @ x`. Everything
stays importable from `dictionary_learning.dictionary`, upstream's import path.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..sparse import SparseCode
from .base import Dictionary, apply_to_values, load_state_dict
from .gated import GatedAutoEncoder
from .jumprelu import JumpReluAutoEncoder
from .matryoshka import MatryoshkaBatchTopKSAE
from .relu import AutoEncoder, AutoEncoderNew, IdentityDict
from .topk import AutoEncoderTopK, BatchTopKSAE, TopKDictionary, topk_codes

DICTIONARY_CLASSES: dict[str, type[Dictionary]] = {
    cls.__name__: cls
    for cls in (AutoEncoder, AutoEncoderNew, IdentityDict, AutoEncoderTopK, BatchTopKSAE,
                GatedAutoEncoder, JumpReluAutoEncoder, MatryoshkaBatchTopKSAE)
}


def dictionary_class(name: Any, source: str = "") -> type[Dictionary]:
    """A dictionary class by its name (as config files and trainer configs give it; `source` names
    where from)."""
    if name not in DICTIONARY_CLASSES:
        raise ValueError(f"unknown dict_class {name!r}{' in ' + source if source else ''}; this "
                         f"toolkit has {sorted(DICTIONARY_CLASSES)}")
    return DICTIONARY_CLASSES[name]


def dictionary_from_config(config: dict[str, Any]) -> Dictionary:
    """Build an (untrained) dictionary from `dictionary_config()` output or an upstream trainer
    config: every key the class's constructor takes is passed on (activation_dim, dict_size, k,
    output_dim, transcoder, ...), except `device` / `dtype`: the dictionary is built on the CPU in
    float32 (upstream configs carry e.g. "cuda")."""
    cls = dictionary_class(config.get("dict_class"))
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs",
                                                                  "device", "dtype"}
    return cls(**{key: value for key, value in config.items() if key in accepted})


__all__ = [
    "DICTIONARY_CLASSES",
    "AutoEncoder",
    "AutoEncoderNew",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "Dictionary",
    "GatedAutoEncoder",
    "IdentityDict",
    "JumpReluAutoEncoder",
    "MatryoshkaBatchTopKSAE",
    "SparseCode",
    "TopKDictionary",
    "apply_to_values",
    "dictionary_class",
    "dictionary_from_config",
    "load_state_dict",
    "topk_codes",
]

"""Dictionaries spliced into a model for circuit discovery: a `Site` is one dictionary at its hook
point(s); `splice` turns sites into `tracing.run` patches that record, differentiate or replace
each site's features and error.

At a site, the model's value x (for a transcoder: the output side y, computed from the input side
x_in) is split into the dictionary's reconstruction and its error:

    x = decode(f) + error,    f = encode(x),    error = x - decode(f)

so every feature and the error are nodes whose values sum (through the decoder) to exactly the
model's value. Splicing never changes the model's computation unless values are replaced.

With `errors="zero"` every site's value is first replaced by its reconstruction decode(encode(x)),
differentiable in x: the replacement model, whose error nodes are zero (an SCAE suite's
linearisation point, `circuits.scae`).

Gradients (mode "attribute") follow Marks et al. 2024's convention: the value written back is x
itself, differentiable in the upstream computation as before (so an upstream node's gradient
passes through the downstream sites unchanged), while f and the error are leaves whose gradients
are those of decode(f) + error at x: W_dec^T g for the features and g for the error, g the
metric's gradient at x.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..models.hooks import HookPoint


@dataclasses.dataclass(frozen=True)
class Site:
    """A dictionary in the model: an SAE reads and writes `point`; a transcoder (`source` given)
    reads its input side `source` and writes its output side `point`."""

    name: str
    dictionary: Any
    point: HookPoint
    source: HookPoint | None = None

    def __post_init__(self):
        if not isinstance(self.point, HookPoint) or not (self.source is None
                                                         or isinstance(self.source, HookPoint)):
            raise TypeError(f"site {self.name!r}: point (and a transcoder's source) must be "
                            f"HookPoints, got {self.point!r}, {self.source!r}")
        transcoder = bool(getattr(self.dictionary, "transcoder", False))
        if transcoder != (self.source is not None):
            raise ValueError(f"site {self.name!r}: a transcoder needs (input side, output side) "
                             "hook points, an SAE one point; got "
                             f"{'a transcoder' if transcoder else 'an SAE'} with "
                             f"{'two' if self.source is not None else 'one'}")

    @property
    def d_sae(self) -> int:
        return int(self.dictionary.dict_size)


def as_sites(spec: Any) -> list[Site]:
    """Sites from a list of `Site`s or a mapping `{name: (dictionary, point)}` (a transcoder:
    `(dictionary, (input side, output side))`)."""
    if isinstance(spec, Mapping):
        sites = []
        for name, value in spec.items():
            if not isinstance(value, tuple) or len(value) != 2:
                raise TypeError(f"site {name!r}: expected (dictionary, point) or (dictionary, "
                                f"(input side, output side)), got {type(value).__name__}")
            dictionary, where = value
            source, point = where if isinstance(where, tuple) else (None, where)
            sites.append(Site(str(name), dictionary, point, source))
        spec = sites
    sites = list(spec)
    if not sites or not all(isinstance(site, Site) for site in sites):
        raise TypeError("expected a non-empty list of Sites or a mapping {name: (dictionary, "
                        "point)}")
    names = [site.name for site in sites]
    written = [(site.point.path, site.point.io) for site in sites]
    if len(set(names)) != len(names) or len(set(written)) != len(written):
        raise ValueError(f"every site needs its own name and its own written hook point, got "
                         f"names {names}")
    return sites


@dataclasses.dataclass
class SiteValues:
    """What a spliced run saw at one site: features `[batch, seq, d_sae]` and error
    `[batch, seq, d]`."""

    features: torch.Tensor
    error: torch.Tensor


Replace = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


MODES = ("record", "attribute", "through", "frozen")
ERRORS = ("keep", "zero")


def splice(sites: list[Site], mode: str | Mapping[str, str], store: dict[str, SiteValues],
           replace: Mapping[str, Replace] | None = None, errors: str = "keep"
           ) -> dict[Any, Callable]:
    """`tracing.run` patches for `sites`. Each site's features and error go into `store[name]`;
    `mode` (one for all, or `{name: mode}`):
    - "record": detached; the value is left as it is;
    - "attribute": leaves requiring grad, the value written back x itself (see the module's
      docstring);
    - "through": computed from x with grad (functions of everything upstream), x left as it is;
    - "frozen": detached, and x written back detached: no gradient passes the site.
    `replace[name](features, error)` -> (features, error) writes decode(features) + error at that
    site instead (from the recorded values, no grad through the site's own input). `errors="zero"`
    first sets each site's value to its reconstruction (see the module's docstring)."""
    modes = {site.name: mode for site in sites} if isinstance(mode, str) else dict(mode)
    for name, value in modes.items():
        if value not in MODES:
            raise ValueError(f"mode of {name!r} must be one of {MODES}, got {value!r}")
    check_errors(errors)
    replace = dict(replace or {})
    patches: dict[Any, Callable] = {}
    for site in sites:
        inputs: dict[str, torch.Tensor] = {}
        if site.source is not None:
            patches[site.source] = _stash(inputs)
        patches[site.point] = _site_patch(site, modes.get(site.name, "record"), store,
                                          replace.get(site.name), inputs, errors == "zero")
    return patches


def check_errors(errors: Any) -> None:
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")


def _stash(inputs: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def keep(x: torch.Tensor) -> torch.Tensor:
        inputs["x"] = x
        return x
    return keep


def _site_patch(site: Site, mode: str, store: dict[str, SiteValues], replace: Replace | None,
                inputs: dict[str, torch.Tensor], zero_errors: bool
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    dictionary = site.dictionary
    parameter = next(iter(dictionary.parameters()), None)
    work = parameter.dtype if parameter is not None else torch.float32

    def patch(value: torch.Tensor) -> torch.Tensor:
        x_in = inputs["x"] if site.source is not None else value
        dtype = value.dtype
        if zero_errors:  # the replacement model: the value is the reconstruction (with grad)
            live = dictionary.encode(x_in.to(work))
            reconstruction = dictionary.decode(live, x=x_in.to(work))
            value = reconstruction.to(dtype)
        if mode == "through":
            if zero_errors:  # an error of zero, in the graph
                store[site.name] = SiteValues(live, (value.to(work) - reconstruction) * 0)
                return value
            features = dictionary.encode(x_in.to(work))
            error = value.to(work) - dictionary.decode(features, x=x_in.to(work))
            store[site.name] = SiteValues(features, error)
            return value
        x_in = x_in.detach().to(work)
        with torch.no_grad():
            if zero_errors:  # (zero, not the rounding of a lower-precision model's dtype)
                features, error = live.detach(), torch.zeros_like(reconstruction)
            else:
                features = dictionary.encode(x_in)
                error = value.detach().to(work) - dictionary.decode(features, x=x_in)
        if replace is not None:
            features, error = replace(features, error)
        if mode == "attribute":
            features = features.detach().requires_grad_(True)
            error = error.detach().requires_grad_(True)
        store[site.name] = SiteValues(features, error)
        if replace is None and mode in ("record", "frozen"):
            return value if mode == "record" else value.detach()
        new = dictionary.decode(features, x=x_in) + error
        if replace is not None:
            return new.to(dtype)
        # x itself, with the leaves' gradients: d new / d features = W_dec^T, d new / d error = I
        return value + (new - new.detach()).to(dtype)

    return patch

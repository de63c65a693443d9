"""A batch as each trainer sees it: `Routing` (which hook point's entry of a dict batch a trainer
trains on), `Scales` (the activation normalisation: estimated once, applied to every batch, folded
into saved weights) and `Feed` (both, plus the head split), which the training loop asks for trainer
i's part of each batch."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Sequence

import torch

Pair = tuple[float, float]
NORMALIZATIONS = (False, True, "unit", "d_model")


def activation_scales(batches: Sequence[Any], target: str = "unit",
                      over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Pair:
    """(scale_in, scale_out) multiplying inputs / targets so that their mean squared norm (the mean
    over batches of each batch's mean squared norm, as upstream's `get_norm_factor`) is 1 ("unit",
    upstream and Gao et al. 2024) or their width ("d_model", Anthropic's April 2024 update).
    `over_ranks` (data-parallel training) turns a rank's mean into the mean over all ranks'
    batches."""
    def scale(tensors: list[torch.Tensor]) -> float:
        mean_squared = sum(t.reshape(-1, t.shape[-1]).float().pow(2).sum(-1).mean().item()
                           for t in tensors)
        mean_squared /= len(tensors)
        if over_ranks is not None:
            mean_squared = over_ranks(torch.tensor(mean_squared, dtype=torch.float64)).item()
        width = tensors[0].shape[-1] if target == "d_model" else 1
        return math.sqrt(width / max(mean_squared, 1e-24))

    if isinstance(batches[0], (tuple, list)):
        return scale([b[0] for b in batches]), scale([b[1] for b in batches])
    s = scale(list(batches))
    return s, s


class Routing:
    """Which entry of dict batches (many hook points from one pass: `{name: batch}`) each trainer
    trains on: the one its config's `submodule_name` (upstream's key) names."""

    def __init__(self, trainers: Sequence[Any]):
        self.names = [trainer.config.get("submodule_name") for trainer in trainers]
        self.checked = False

    def check(self, available: Iterable[str]) -> None:
        available = list(available)
        for i, name in enumerate(self.names):
            if name is None:
                raise ValueError(f"trainer {i}'s config has no submodule_name: with batches from "
                                 f"many hook points ({available}) each trainer config names the "
                                 f"one it trains on, e.g. submodule_name={available[0]!r}")
            if name not in available:
                raise ValueError(f"trainer {i}'s submodule_name={name!r} is not one of the hook "
                                 f"points the data yields: {available}")
        self.checked = True

    def used(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The entries of a dict batch some trainer trains on (checking the names on the first
        one)."""
        if not self.checked:
            self.check(batch)
        return {name: batch[name] for name in dict.fromkeys(self.names)}

    def __call__(self, i: int, batch: Any) -> Any:
        """Trainer i's part of a batch."""
        return batch[self.names[i]] if isinstance(batch, dict) else batch


def _scaled(batch: Any, scale_in: float, scale_out: float) -> Any:
    if (scale_in, scale_out) == (1.0, 1.0):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0] * scale_in, batch[1] * scale_out
    return batch * scale_in


class Scales:
    """The normalisation factors: one (scale_in, scale_out) pair, or one per hook point name for
    dict batches. Inputs and targets are multiplied by them while training; saved weights have them
    folded in, so they work on raw activations."""

    def __init__(self, routing: Routing, value: Pair | dict[str, Pair] = (1.0, 1.0)):
        self.routing, self.value = routing, value

    @classmethod
    def saved(cls, routing: Routing, saved: Any) -> Scales:
        """From a checkpoint's `scales` entry (lists, as `to_save` writes them)."""
        if isinstance(saved, dict):
            return cls(routing, {name: tuple(pair) for name, pair in saved.items()})
        return cls(routing, tuple(saved))

    def estimate(self, sample: list[Any], target: str, over_ranks: Callable | None) -> None:
        """Factors giving the `sample` batches (not trained on, as upstream) unit mean squared norm
        ("unit") or their width ("d_model"); over all ranks' batches with `over_ranks`."""
        if not sample:
            raise ValueError("data yielded no batches")
        if isinstance(sample[0], dict):
            self.routing.check(sample[0])
            self.value = {name: activation_scales([batch[name] for batch in sample], target,
                                                  over_ranks)
                          for name in dict.fromkeys(self.routing.names)}
        else:
            self.value = activation_scales(sample, target, over_ranks)

    def of(self, i: int) -> Pair:
        """Trainer i's pair."""
        return self.value[self.routing.names[i]] if isinstance(self.value, dict) else self.value

    def apply(self, batch: Any) -> Any:
        """A batch scaled (for dict batches: only the entries some trainer trains on, each by its
        own pair)."""
        if isinstance(batch, dict):
            used = self.routing.used(batch)
            if not isinstance(self.value, dict):
                return used
            return {name: _scaled(part, *self.value[name]) for name, part in used.items()}
        if isinstance(self.value, dict):
            raise ValueError("the data yielded a single batch where the checkpoint (or the "
                             "normalisation batches) had a dict of hook points")
        return _scaled(batch, *self.value)

    def folded(self, ae: Any, i: int) -> Any:
        """Trainer i's dictionary with its pair folded in (a copy; the dictionary itself when there
        is none)."""
        pair = self.of(i)
        if pair == (1.0, 1.0):
            return ae
        ae = copy.deepcopy(ae)
        ae.fold_scale(*pair)
        return ae

    def to_save(self) -> Any:
        """The factors as a checkpoint holds them (lists)."""
        if isinstance(self.value, dict):
            return {name: list(pair) for name, pair in self.value.items()}
        return list(self.value)


class Feed:
    """Each trainer's part of a batch: scaled by `scales`, the entry `routing` names for dict
    batches, and with `split_by_head` (batches `[batch, n_heads, d_head]`) head i for trainer i."""

    def __init__(self, routing: Routing, scales: Scales, split_by_head: bool = False):
        self.routing, self.scales, self.split_by_head = routing, scales, split_by_head

    def prepare(self, batch: Any) -> Any:
        return self.scales.apply(batch)

    def select(self, i: int, batch: Any) -> Any:
        batch = self.routing(i, batch)
        return batch[..., i, :] if self.split_by_head else batch

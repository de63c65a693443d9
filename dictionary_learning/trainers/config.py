"""What every training method's config shares: `TrainerConfig` (a dataclass with a JSON round trip
and the fields compared on resume), `PenaltyConfig` (a sparsity penalty ramped in) and
`check_schedule`, every method's schedule rules."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..checks import finite_hyperparameters, integer
from ..dictionary import Dictionary, dictionary_class
from ..dictionary.base import Widths
from ..files import json_safe

# fields that describe where a run reads or runs, not how it trains: a resumed run may change them
NOT_COMPARED_ON_RESUME = ("layer", "lm_name", "wandb_name", "submodule_name", "device")


@dataclasses.dataclass(kw_only=True)
class TrainerConfig(Widths):
    """What every method takes. `dict_class` None: the method's own dictionary class."""

    steps: int
    activation_dim: int
    dict_size: int
    dict_class: type[Dictionary] | None = None
    lr: float | None = 1e-3
    warmup_steps: int = 1000
    decay_start: int | None = None
    seed: int | None = None
    device: str | None = None
    dead_feature_threshold: int = 10_000_000
    output_dim: int | None = None
    transcoder: bool = False
    skip: bool = False
    layer: int | None = None
    lm_name: str | None = None
    wandb_name: str | None = None
    submodule_name: str | None = None
    initial_weights: str | None = None

    def __post_init__(self) -> None:
        integer("steps", self.steps)
        if isinstance(self.dict_class, str):
            self.dict_class = dictionary_class(self.dict_class)
        if self.initial_weights is not None:
            self.initial_weights = str(self.initial_weights)
        finite_hyperparameters(type(self).__name__.removesuffix("Config") + "Trainer",
                               dataclasses.asdict(self))
        check_schedule(self.steps, self.warmup_steps, self.decay_start,
                       getattr(self, "resample_steps", None),
                       getattr(self, "sparsity_warmup_steps", None))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (dict_class and dtypes as names); `type(config).from_dict` reads it back."""
        return json_safe({field.name: getattr(self, field.name)
                          for field in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainerConfig:
        """The config of a saved `to_dict` (keys that are not fields, such as a saved config's
        trainer_class, are ignored)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    def compared_on_resume(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint: every hyperparameter, as JSON
        values."""
        return {key: value for key, value in self.to_dict().items()
                if key not in NOT_COMPARED_ON_RESUME}


@dataclasses.dataclass(kw_only=True)
class PenaltyConfig(TrainerConfig):
    """A method with a sparsity penalty, ramped in over `sparsity_warmup_steps` (None or 0: no
    ramp)."""

    sparsity_warmup_steps: int | None = 2000


def _count(name: str, value: Any, low: int = 0) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ValueError(f"{name} must be None or an int >= {low}, got {value!r}")


def check_schedule(steps: int, warmup_steps: int, decay_start: int | None,
                   resample_steps: int | None, sparsity_warmup_steps: int | None) -> None:
    """Every method's schedule rules: upstream's, except that warmups longer than the run are cut to
    it (`parts.lr_schedule`), a decay may start as a warmup ends, and resampling periods longer than
    the run are allowed (no neuron is then resampled)."""
    if warmup_steps is None:
        raise ValueError("warmup_steps must be an int >= 0, got None")
    _count("warmup_steps", warmup_steps)
    _count("sparsity_warmup_steps", sparsity_warmup_steps)
    _count("resample_steps", resample_steps, 1)
    _count("decay_start", decay_start)
    if decay_start is None:
        return
    if resample_steps is not None:
        raise ValueError(f"decay_start ({decay_start}) and resample_steps ({resample_steps}) "
                         "cannot both be set: the lr warmup restarts after each resampling, and "
                         "nothing decays")
    if not decay_start < steps:
        raise ValueError(f"decay_start must be in [0, steps={steps}), got {decay_start}")
    for name, warmup in (("warmup_steps", warmup_steps),
                         ("sparsity_warmup_steps", sparsity_warmup_steps)):
        if warmup is not None and decay_start < min(warmup, steps):
            raise ValueError(f"decay_start must be >= {name}={warmup}, got {decay_start} (the "
                             f"decay starts after the warmup): lower {name} or move decay_start "
                             "later")

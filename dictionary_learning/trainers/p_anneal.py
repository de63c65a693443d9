"""PAnnealTrainer, upstream's `trainers.p_anneal`: a ReLU SAE (unit-norm decoder, as the original
StandardTrainer) whose sparsity penalty is the L_p norm of the codes ('Lp': (sum f^p)^(1/p), or
'Lp^p': sum f^p), with p annealed from `p_start` towards `p_end` in `n_sparsity_updates` steps
evenly spaced between `anneal_start` and `anneal_end`; at each change of p the coefficient is
rescaled so the penalty's size carries over (`parts.PAnnealing`). Optional dead-neuron resampling as
in `StandardTrainer`. `AnnealConfig` and `lp_penalty` are shared with `gated_anneal.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import parts
from .base import PenaltyConfig, StepOutput
from .standard import ReLUTrainer

SPARSITY_FUNCTIONS = ("Lp", "Lp^p")


def lp_penalty(f: torch.Tensor, p: float, sparsity_function: str) -> torch.Tensor:
    """The penalty at exponent p, averaged over tokens: (sum_i f_i^p)^(1/p) ('Lp') or sum_i f_i^p
    ('Lp^p'). At p = 0, 'Lp^p' is the number of active codes (its p -> 0 limit, without gradient);
    'Lp' is undefined there."""
    if p == 0:
        if sparsity_function == "Lp":
            raise ValueError("the 'Lp' penalty (sum f^p)^(1/p) is undefined at p = 0")
        return (f != 0).sum(dim=-1).to(f.dtype).mean()
    total = f.pow(p).sum(dim=-1)  # [batch]
    return total.mean() if sparsity_function == "Lp^p" else total.pow(1 / p).mean()


@dataclasses.dataclass(kw_only=True)
class AnnealConfig(PenaltyConfig):
    """The p-annealing fields (`anneal_end` None: the run's end; `n_sparsity_updates` "continuous":
    one per step)."""

    sparsity_function: str = "Lp"
    initial_sparsity_penalty: float = 1e-1
    anneal_start: int = 15000
    anneal_end: int | None = None
    p_start: float = 1
    p_end: float = 0
    n_sparsity_updates: int | str = 10
    sparsity_queue_length: int = 10
    resample_steps: int | None = None
    seed: int | None = 42

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity_function not in SPARSITY_FUNCTIONS:
            raise ValueError(f"sparsity_function must be one of {SPARSITY_FUNCTIONS}, got "
                             f"{self.sparsity_function!r}")
        if not self.p_start > 0 or not self.p_end >= 0:
            raise ValueError(f"p_start must be > 0 and p_end >= 0, got p_start={self.p_start}, "
                             f"p_end={self.p_end}")
        if self.anneal_end is None:  # the run's end (an anneal_start after it: p stays at p_start)
            self.anneal_end = max(self.steps, self.anneal_start)
        if not 0 <= self.anneal_start <= self.anneal_end:
            raise ValueError(f"expected 0 <= anneal_start <= anneal_end, got {self.anneal_start} "
                             f"and {self.anneal_end}")
        if self.n_sparsity_updates == "continuous":
            self.n_sparsity_updates = self.anneal_end - self.anneal_start + 1
        n = self.n_sparsity_updates
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("n_sparsity_updates must be a positive int or 'continuous', got "
                             f"{n!r}")
        integer_length = self.sparsity_queue_length
        if (isinstance(integer_length, bool) or not isinstance(integer_length, int)
                or integer_length < 1):
            raise ValueError("sparsity_queue_length must be a positive int, got "
                             f"{integer_length!r}")
        if self.sparsity_function == "Lp" and self.p_end == 0:
            updates = torch.linspace(self.anneal_start, self.anneal_end, n, dtype=int)
            if len({s for s in updates.tolist() if s < self.steps}) == n:
                raise ValueError(f"p reaches p_end=0 at step {updates[-1].item()} < "
                                 f"steps={self.steps}, where the 'Lp' penalty (sum f^p)^(1/p) is "
                                 "undefined: use p_end > 0, sparsity_function='Lp^p', or an "
                                 "anneal_end >= steps (the default)")


@dataclasses.dataclass(kw_only=True)
class PAnnealConfig(AnnealConfig):
    wandb_name: str | None = "PAnnealTrainer"


class Annealed:
    """What the p-annealing trainers share: the `parts.PAnnealing` state (`p`, `next_p`,
    `sparsity_coeff`, ... as attributes, upstream's), its penalty on a batch, its update after each
    step, and its saved state."""

    # in data-parallel training the penalty's rescaling averages each rank's own queue
    exact_data_parallel = False
    logging_parameters = ["p", "next_p", "lp_loss", "scaled_lp_loss", "sparsity_coeff"]

    def setup(self) -> None:
        cfg = self.cfg
        self.annealing = parts.PAnnealing(cfg.p_start, cfg.p_end, cfg.anneal_start, cfg.anneal_end,
                                          cfg.n_sparsity_updates, cfg.sparsity_queue_length,
                                          cfg.initial_sparsity_penalty)
        self.lp_loss = self.scaled_lp_loss = 0.0

    # p, next_p, sparsity_coeff, sparsity_queue, p_step_count, ...
    def __getattr__(self, name: str) -> Any:
        annealing = self.__dict__.get("annealing")
        if annealing is not None and name in vars(annealing):
            return getattr(annealing, name)
        return super().__getattr__(name)

    # `trainer.p = ...` sets the annealing's p
    def __setattr__(self, name: str, value: Any) -> None:
        annealing = self.__dict__.get("annealing")
        if annealing is not None and name in vars(annealing):
            setattr(annealing, name, value)
        else:
            super().__setattr__(name, value)

    def lp_norm(self, f: torch.Tensor, p: float) -> torch.Tensor:
        return lp_penalty(f, p, self.cfg.sparsity_function)

    def annealed_penalty(self, codes: torch.Tensor, step: int) -> tuple[torch.Tensor,
                                                                        dict[str, float]]:
        """coefficient * ramp * L_p(codes) at the current p."""
        a = self.annealing
        lp = self.lp_norm(codes, a.p)
        scaled = lp * a.sparsity_coeff * self.sparsity_warmup_fn(step)
        return scaled, {"lp_loss": lp.item(), "scaled_lp_loss": scaled.item(),
                        "sparsity_coeff": a.sparsity_coeff, "p": a.p}

    def after_step(self, step: int, x: torch.Tensor, y: torch.Tensor, out: StepOutput) -> None:
        """Queue the penalty at p and at next_p (on the step's penalised codes), then anneal."""
        super().after_step(step, x, y, out)
        a = self.annealing
        self.lp_loss, self.scaled_lp_loss = out.metrics["lp_loss"], out.metrics["scaled_lp_loss"]
        at_next_p = None
        if a.next_p is not None and (a.next_p > 0 or self.cfg.sparsity_function == "Lp^p"):
            with torch.no_grad():
                at_next_p = self.lp_norm(out.state.get("penalised", out.state["code"]).detach(),
                                         a.next_p).item()
        a.record(self.lp_loss, at_next_p)
        a.advance(step)

    def config_values(self) -> dict[str, Any]:  # upstream's `sparsity_penalty`: the coefficient now
        return {**super().config_values(), "sparsity_penalty": self.annealing.sparsity_coeff}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "annealing": self.annealing.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.annealing.load_state_dict(state["annealing"])


class PAnnealTrainer(Annealed, ReLUTrainer):
    """Trains an `AutoEncoder` (or a transcoder of that class) with an annealed L_p penalty."""

    Config = PAnnealConfig
    positions = ("steps", "activation_dim", "dict_size", "layer", "lm_name", "dict_class", "lr",
                 "warmup_steps", "decay_start", "sparsity_warmup_steps", "sparsity_function",
                 "initial_sparsity_penalty", "anneal_start", "anneal_end", "p_start", "p_end",
                 "n_sparsity_updates",
                 "sparsity_queue_length",
                 "resample_steps", "device", "seed", "wandb_name", "submodule_name")
    max_grad_norm = None  # upstream does not clip here
    unit_norm_decoder = True
    resample_phase = -1  # upstream resamples at step % resample_steps == resample_steps - 1

    def penalty(self, f: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.annealed_penalty(f, step)

"""PAnnealTrainer, upstream's `trainers.p_anneal`: a ReLU SAE (unit-norm decoder through `ConstrainedAdam`, as the
original StandardTrainer) whose sparsity penalty is the L_p norm of the codes ('Lp': (sum f^p)^(1/p), or 'Lp^p':
sum f^p), with p annealed from `p_start` towards `p_end` in `n_sparsity_updates` steps evenly spaced between
`anneal_start` and `anneal_end`. At each change of p the coefficient is rescaled by the ratio of the recent penalty
at the old p to that at the new p (averaged over a queue of the last `sparsity_queue_length` steps), so the
penalty's size carries over. Optional dead-neuron resampling as in `StandardTrainer`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..dictionary import AutoEncoder, Dictionary
from .standard import ReLUTrainer
from .trainer import LossLog, upstream_loss_call

SPARSITY_FUNCTIONS = ("Lp", "Lp^p")


class PAnnealTrainer(ReLUTrainer):
    """Trains an `AutoEncoder` (or a transcoder of that class) with an annealed L_p penalty."""

    exact_data_parallel = False  # in data-parallel training the penalty's rescaling averages each rank's own queue

    max_grad_norm = None  # upstream does not clip here

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type[Dictionary] = AutoEncoder,
        lr: float = 1e-3,
        warmup_steps: int = 1000,
        decay_start: int | None = None,
        sparsity_warmup_steps: int | None = 2000,
        sparsity_function: str = "Lp",
        initial_sparsity_penalty: float = 1e-1,
        anneal_start: int = 15000,
        anneal_end: int | None = None,
        p_start: float = 1,
        p_end: float = 0,
        n_sparsity_updates: int | str = 10,
        sparsity_queue_length: int = 10,
        resample_steps: int | None = None,
        device: str | None = None,
        seed: int | None = 42,
        wandb_name: str = "PAnnealTrainer",
        submodule_name: str | None = None,
        *,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip: bool = False,
        dead_feature_threshold: int = 10_000_000,
    ):
        if sparsity_function not in SPARSITY_FUNCTIONS:
            raise ValueError(f"sparsity_function must be one of {SPARSITY_FUNCTIONS}, got {sparsity_function!r}")
        if not p_start > 0 or not p_end >= 0:
            raise ValueError(f"p_start must be > 0 and p_end >= 0, got p_start={p_start}, p_end={p_end}")
        anneal_end = anneal_end if anneal_end is not None else steps
        if not 0 <= anneal_start <= anneal_end:
            raise ValueError(f"expected 0 <= anneal_start <= anneal_end, got {anneal_start} and {anneal_end}")
        if n_sparsity_updates == "continuous":
            n_sparsity_updates = anneal_end - anneal_start + 1
        if isinstance(n_sparsity_updates, bool) or not isinstance(n_sparsity_updates, int) or n_sparsity_updates < 1:
            raise ValueError(f"n_sparsity_updates must be a positive int or 'continuous', got {n_sparsity_updates!r}")
        super().__init__(
            steps, activation_dim, dict_size, layer=layer, lm_name=lm_name, dict_class=dict_class, lr=lr,
            warmup_steps=warmup_steps, sparsity_warmup_steps=sparsity_warmup_steps, decay_start=decay_start,
            resample_steps=resample_steps, seed=seed, device=device, wandb_name=wandb_name,
            submodule_name=submodule_name, output_dim=output_dim, transcoder=transcoder, skip=skip,
            dead_feature_threshold=dead_feature_threshold, constrained=True,
            config={"sparsity_function": sparsity_function, "initial_sparsity_penalty": initial_sparsity_penalty,
                    "p_start": p_start, "p_end": p_end, "anneal_start": anneal_start, "anneal_end": anneal_end,
                    "sparsity_queue_length": sparsity_queue_length, "n_sparsity_updates": n_sparsity_updates,
                    "resample_steps": resample_steps},
        )
        self.activation_dim, self.dict_size = activation_dim, dict_size
        self.sparsity_function = sparsity_function
        self.anneal_start, self.anneal_end = anneal_start, anneal_end
        self.p_start, self.p_end = p_start, p_end
        self.n_sparsity_updates = n_sparsity_updates
        self.sparsity_update_steps = torch.linspace(anneal_start, anneal_end, n_sparsity_updates, dtype=int)
        self.p_values = torch.linspace(p_start, p_end, n_sparsity_updates)
        if sparsity_function == "Lp" and self.p_values[-1] == 0:
            applied = len({s for s in self.sparsity_update_steps.tolist() if s < steps})
            if applied == n_sparsity_updates:
                raise ValueError(f"p reaches p_end=0 at step {self.sparsity_update_steps[-1].item()} < steps={steps}, "
                                 "where the 'Lp' penalty (sum f^p)^(1/p) is undefined: use p_end > 0, "
                                 "sparsity_function='Lp^p', or an anneal_end >= steps (upstream's default)")
        self.initial_sparsity_penalty = initial_sparsity_penalty
        self.sparsity_coeff = initial_sparsity_penalty  # alpha, rescaled at each change of p
        self.sparsity_queue_length = sparsity_queue_length
        self.sparsity_queue: list[list[float]] = []  # [penalty at p, penalty at next_p] of recent steps
        self.p, self.next_p, self.p_step_count = float(p_start), None, 0
        self.lp_loss = self.scaled_lp_loss = 0.0
        self.logging_parameters = ["p", "next_p", "lp_loss", "scaled_lp_loss", "sparsity_coeff"]

    def lp_norm(self, f: torch.Tensor, p: float) -> torch.Tensor:
        """The penalty at exponent p, averaged over tokens: (sum_i f_i^p)^(1/p) ('Lp') or sum_i f_i^p ('Lp^p').
        At p = 0, 'Lp^p' is the number of active codes (its p -> 0 limit, without gradient); 'Lp' is undefined."""
        if p == 0:
            if self.sparsity_function == "Lp":
                raise ValueError("the 'Lp' penalty (sum f^p)^(1/p) is undefined at p = 0")
            return (f != 0).sum(dim=-1).to(f.dtype).mean()
        total = f.pow(p).sum(dim=-1)  # [batch]
        return total.mean() if self.sparsity_function == "Lp^p" else total.pow(1 / p).mean()

    def _usable(self, p: float | None) -> bool:
        return p is not None and (p > 0 or self.sparsity_function == "Lp^p")

    @torch.no_grad()
    def _anneal(self, step: int) -> None:
        """At the steps of `sparsity_update_steps`, move p to its next value and rescale the coefficient."""
        if self.p_step_count >= self.n_sparsity_updates or step not in self.sparsity_update_steps:
            return
        if step < self.sparsity_update_steps[self.p_step_count]:
            return
        if self.next_p is not None and self.sparsity_queue:
            at_p, at_next_p = torch.tensor(self.sparsity_queue).mean(dim=0)  # float32 means, as upstream
            if at_next_p > 0 and torch.isfinite(at_p) and torch.isfinite(at_next_p):
                self.sparsity_coeff = self.sparsity_coeff * (at_p / at_next_p).item()
        self.p = self.p_values[self.p_step_count].item()
        last = self.p_step_count == self.n_sparsity_updates - 1
        self.next_p = self.p_end if last else self.p_values[self.p_step_count + 1].item()
        self.p_step_count += 1

    def loss(self, x: torch.Tensor, step: int, logging: bool = False, y: torch.Tensor | None = None, **kwargs: Any):
        """Reconstruction + sparsity_coeff * warmup * L_p penalty at the current p, upstream's call (transcoders pass
        their target as `y`). With `logging`, returns LossLog(x, x_hat, f, {p, next_p, lp_loss, ...}) and changes
        no training state."""
        y, step, logging = upstream_loss_call(x, step, logging, y)
        y_hat, f = self.ae(x, output_features=True)
        recon = (y - y_hat).pow(2).sum(dim=-1).mean()
        lp_loss = self.lp_norm(f, self.p)
        scaled_lp_loss = lp_loss * self.sparsity_coeff * self.sparsity_warmup_fn(step)
        loss = recon + scaled_lp_loss
        if logging:
            return LossLog(x, y_hat, f, {"p": self.p, "next_p": self.next_p, "lp_loss": lp_loss.item(),
                                         "scaled_lp_loss": scaled_lp_loss.item(),
                                         "sparsity_coeff": self.sparsity_coeff})
        self.lp_loss, self.scaled_lp_loss = lp_loss.item(), scaled_lp_loss.item()
        if self._usable(self.next_p):
            with torch.no_grad():
                self.sparsity_queue.append([self.lp_loss, self.lp_norm(f, self.next_p).item()])
            self.sparsity_queue = self.sparsity_queue[-self.sparsity_queue_length:]
        self._anneal(step)
        l0 = self._track_codes(f)
        self._record(y, y_hat.detach(), l0, loss, mse_loss=recon.item(), lp_loss=self.lp_loss, p=self.p)
        return loss

    def _resample_due(self, step: int) -> bool:
        return self.resample_steps is not None and step % self.resample_steps == self.resample_steps - 1

    @property
    def config(self) -> dict[str, Any]:
        """The saved config, with upstream's `sparsity_penalty` (the coefficient now)."""
        return {**super().config, "sparsity_penalty": self.sparsity_coeff}

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "p": self.p, "next_p": self.next_p, "p_step_count": self.p_step_count,
                "sparsity_coeff": self.sparsity_coeff, "sparsity_queue": [list(e) for e in self.sparsity_queue]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        for key in ("p", "next_p", "p_step_count", "sparsity_coeff", "sparsity_queue"):
            if key in state:
                setattr(self, key, state[key])

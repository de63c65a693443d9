"""GatedAnnealTrainer: a gated SAE whose sparsity penalty is annealed from the L1 norm towards L0 (upstream's
trainers.gated_anneal), also for gated transcoders.

The loss is `gdm.py`'s with the gate path's L1 norm replaced by an Lp penalty (`sparsity_function` "Lp^p":
sum_i g_i^p, or "Lp": (sum_i g_i^p)^(1/p)), averaged over the batch, weighted by the coefficient alpha and the
sparsity warmup ramp. p starts at `p_start`; from `anneal_start` to `anneal_end` it steps `n_sparsity_updates` times
along linspace(p_start, p_end) (an update at step s applies from step s + 1). At each update after the first, alpha is
rescaled by mean(Lp at the current p) / mean(Lp at the next p) over the last `sparsity_queue_length` steps, so the
penalty's size carries over to the new p. With `resample_steps`, latents that fired on no token for more than
resample_steps / 2 steps are resampled every resample_steps steps, and the lr warmup restarts each time.
"""

from __future__ import annotations

from typing import Any

import torch

from ..dictionary import Dictionary, GatedAutoEncoder
from .gdm import checked_warmups, gated_terms, use_gated_optimizer
from .trainer import SAETrainer, sparsity_schedule, split_batch, trainer_lr_schedule, upstream_loss_call

SPARSITY_FUNCTIONS = ("Lp^p", "Lp")


class GatedAnnealTrainer(SAETrainer):
    """Trains a `GatedAutoEncoder` (or a gated transcoder) with p-annealing of its sparsity penalty."""

    exact_data_parallel = False  # in data-parallel training the penalty's rescaling averages each rank's own queue

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type[Dictionary] = GatedAutoEncoder,
        lr: float = 3e-4,
        warmup_steps: int = 1000,
        sparsity_warmup_steps: int | None = 2000,
        decay_start: int | None = None,
        sparsity_function: str = "Lp^p",
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
        wandb_name: str = "GatedAnnealTrainer",
        *,
        submodule_name: str | None = None,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip: bool = False,
    ):
        if sparsity_function not in SPARSITY_FUNCTIONS:
            raise ValueError(f"sparsity_function must be one of {SPARSITY_FUNCTIONS}, got {sparsity_function!r}")
        anneal_end = anneal_end if anneal_end is not None else steps
        if n_sparsity_updates == "continuous":
            n_sparsity_updates = anneal_end - anneal_start + 1
        if isinstance(n_sparsity_updates, bool) or not isinstance(n_sparsity_updates, int) or n_sparsity_updates < 1:
            raise ValueError(f"n_sparsity_updates must be a positive int or 'continuous', got {n_sparsity_updates!r}")
        warmup_steps, sparsity_warmup_steps = checked_warmups(steps, warmup_steps, sparsity_warmup_steps)
        super().__init__(
            seed, steps=steps, lr=lr, warmup_steps=warmup_steps, decay_start=decay_start, device=device,
            build_dictionary=lambda: dict_class(activation_dim, dict_size, output_dim=output_dim,
                                                transcoder=transcoder, skip=skip),
            config={"sparsity_function": sparsity_function, "initial_sparsity_penalty": initial_sparsity_penalty,
                    "p_start": p_start, "p_end": p_end, "anneal_start": anneal_start, "anneal_end": anneal_end,
                    "sparsity_queue_length": sparsity_queue_length, "n_sparsity_updates": n_sparsity_updates,
                    "resample_steps": resample_steps, "sparsity_warmup_steps": sparsity_warmup_steps,
                    "layer": layer, "lm_name": lm_name, "wandb_name": wandb_name, "submodule_name": submodule_name},
        )
        use_gated_optimizer(self, lr, trainer_lr_schedule(steps, warmup_steps, decay_start, resample_steps,
                                                        sparsity_warmup_steps))
        self.sparsity_warmup_fn = sparsity_schedule(sparsity_warmup_steps)
        self.layer, self.lm_name, self.submodule_name, self.wandb_name = layer, lm_name, submodule_name, wandb_name
        self.activation_dim, self.dict_size = activation_dim, dict_size
        self.warmup_steps, self.sparsity_warmup_steps = warmup_steps, sparsity_warmup_steps
        self.decay_start = decay_start
        self.sparsity_function = sparsity_function
        self.anneal_start, self.anneal_end, self.p_start, self.p_end = anneal_start, anneal_end, p_start, p_end
        self.n_sparsity_updates, self.sparsity_queue_length = n_sparsity_updates, sparsity_queue_length
        self.sparsity_update_steps = torch.linspace(anneal_start, anneal_end, n_sparsity_updates, dtype=int)
        self.p_values = torch.linspace(p_start, p_end, n_sparsity_updates)
        # the annealing state (resumable: see _extra_state)
        self.p, self.next_p, self.p_step_count = p_start, None, 0
        self.sparsity_coeff = initial_sparsity_penalty  # alpha
        self.sparsity_queue: list[list[float]] = []  # [Lp at p, Lp at next_p] of recent steps
        self.lp_loss = self.scaled_lp_loss = None
        self.resample_steps = resample_steps
        self.steps_since_active = (torch.zeros(dict_size, dtype=torch.long, device=self.device)
                                   if resample_steps is not None else None)
        self.resample_generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        self.logging_parameters = ["p", "next_p", "lp_loss", "scaled_lp_loss", "sparsity_coeff"]

    def lp_norm(self, f: torch.Tensor, p: float) -> torch.Tensor:
        """The batch mean of sum_i f_i^p ("Lp^p") or of its 1/p-th power ("Lp")."""
        total = f.pow(p).sum(dim=-1)
        return total.mean() if self.sparsity_function == "Lp^p" else total.pow(1 / p).mean()

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, y: torch.Tensor | None = None,
             **kwargs: Any):
        """The gated loss, upstream's call `loss(x, step, logging)` (transcoders pass their target as `y`;
        `loss(x, y, step)` works too). With `logging`, returns upstream's LossLog(x, x_hat, f, losses) and changes
        no training state."""
        y, step, logging = upstream_loss_call(x, step, logging, y)
        if logging:
            return self.loss_log(x, y)
        y_hat, f, gate, reconstruction, auxiliary = gated_terms(self.ae, x, y)
        lp_loss = self.lp_norm(gate, self.p)
        scaled_lp_loss = lp_loss * self.sparsity_coeff * self.sparsity_warmup_fn(step)
        self.lp_loss, self.scaled_lp_loss = lp_loss.item(), scaled_lp_loss.item()
        if self.next_p is not None:
            with torch.no_grad():
                self.sparsity_queue.append([lp_loss.item(), self.lp_norm(gate, self.next_p).item()])
            self.sparsity_queue = self.sparsity_queue[-self.sparsity_queue_length:]
        self._anneal(step)
        loss = reconstruction + scaled_lp_loss + auxiliary
        with torch.no_grad():
            active = f > 0
            fired = active.any(dim=0)
            self._track(fired.nonzero().flatten(), x.shape[0])
            if self.steps_since_active is not None:
                self.steps_since_active[~fired] += 1
                self.steps_since_active[fired] = 0
            l0 = active.sum(dim=-1).float().mean().item()
        self._record(y, y_hat.detach(), l0, loss, mse_loss=reconstruction.item(), aux_loss=auxiliary.item(),
                     lp_loss=self.lp_loss, sparsity_loss=self.scaled_lp_loss, sparsity_coeff=self.sparsity_coeff,
                     p=self.p)
        return loss

    def _anneal(self, step: int) -> None:
        """At the update steps: rescale alpha from the queue (after the first update), then move p one value on."""
        if step not in self.sparsity_update_steps or step < self.sparsity_update_steps[self.p_step_count]:
            return
        if self.next_p is not None:
            queue = torch.tensor(self.sparsity_queue)  # [n, 2]
            self.sparsity_coeff = self.sparsity_coeff * (queue[:, 0].mean() / queue[:, 1].mean()).item()
        self.p = self.p_values[self.p_step_count].item()
        last = self.p_step_count >= self.n_sparsity_updates - 1
        self.next_p = self.p_end if last else self.p_values[self.p_step_count + 1].item()
        self.p_step_count += 1

    def update(self, step: int, activations: Any) -> float:
        loss = super().update(step, activations)
        if self.resample_steps is not None and step % self.resample_steps == self.resample_steps - 1:
            x, y = split_batch(activations, self.ae)
            param = next(self.ae.parameters())
            self.resample_neurons(self.steps_since_active > self.resample_steps / 2,
                                  x.to(param.device, param.dtype), y.to(param.device, param.dtype))
        return loss

    @torch.no_grad()
    def resample_neurons(self, deads: torch.Tensor, activations: torch.Tensor, targets: torch.Tensor | None = None
                         ) -> None:
        """Re-initialise dead latents from inputs drawn with probability proportional to their reconstruction
        error: encoder row = input * 0.2 * the mean alive encoder row norm, decoder column = the target's direction,
        b_gate, b_mag and r_mag zero, and their Adam moments cleared."""
        n_dead = int(deads.sum())
        if n_dead == 0:
            return
        targets = activations if targets is None else targets
        errors = (targets - self.ae(activations)).norm(dim=-1).float().cpu()  # [batch]
        if not errors.sum() > 0:  # a perfect (or broken) batch: draw uniformly
            errors = torch.ones_like(errors)
        n_resample = min(n_dead, errors.shape[0])
        picked = torch.multinomial(errors, n_resample, replacement=False,
                                   generator=self.resample_generator).to(activations.device)
        latents = deads.nonzero().flatten()[:n_resample]
        encoder, decoder = self.ae.encoder.weight, self.ae.decoder.weight
        alive_norm = encoder[~deads].norm(dim=-1).mean() if n_dead < deads.numel() else torch.tensor(1.0)
        encoder[latents] = activations[picked] * alive_norm * 0.2
        sampled = targets[picked]
        decoder[:, latents] = (sampled / sampled.norm(dim=-1, keepdim=True)).T
        for parameter in (self.ae.gate_bias, self.ae.mag_bias, self.ae.r_mag):
            parameter[latents] = 0.0
        for parameter, dim in ((encoder, 0), (decoder, 1), (self.ae.gate_bias, 0), (self.ae.mag_bias, 0),
                               (self.ae.r_mag, 0)):
            for moment in ("exp_avg", "exp_avg_sq"):
                state = self.optimizer.state.get(parameter, {})
                if moment in state:
                    state[moment].index_fill_(dim, latents, 0.0)

    # resumable state -------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"p": self.p, "next_p": self.next_p, "p_step_count": self.p_step_count,
                "sparsity_coeff": self.sparsity_coeff, "sparsity_queue": [list(q) for q in self.sparsity_queue],
                "steps_since_active": self.steps_since_active,
                "resample_generator": self.resample_generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.p, self.next_p, self.p_step_count = state["p"], state["next_p"], state["p_step_count"]
        self.sparsity_coeff, self.sparsity_queue = state["sparsity_coeff"], [list(q) for q in state["sparsity_queue"]]
        if state["steps_since_active"] is not None:
            self.steps_since_active = state["steps_since_active"].to(self.device)
        self.resample_generator.set_state(state["resample_generator"])

    @property
    def config(self) -> dict[str, Any]:
        """Upstream's keys (`sparsity_penalty` is the current alpha) and this toolkit's."""
        return {**super().config, "sparsity_penalty": self.sparsity_coeff}

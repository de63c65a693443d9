"""The ReLU SAE trainers at upstream's `trainers.standard`:

- `StandardTrainer`: upstream's original recipe (Towards Monosemanticity). Decoder columns kept at unit norm by
  `ConstrainedAdam`; loss = squared error summed over the output and averaged over the batch, plus `l1_penalty`
  times the L1 norm of the codes (or, with `entropy=True`, the founding README's entropy of each token's normalised
  codes); optional dead-neuron resampling every `resample_steps` steps (the lr warmup then restarts). No clipping.
- `StandardTrainerAprilUpdate`: Anthropic's April 2024 update. Decoder norms are free, the L1 term weights each
  code by its decoder column norm, gradients are clipped to norm 1.

Both use upstream's schedules (lr `step / warmup_steps`, sparsity penalty `step / sparsity_warmup_steps`) and train
transcoders too (`output_dim`, `transcoder`, `skip`; batches are then (x, y) pairs).
"""

from __future__ import annotations

from typing import Any

import torch

from ..dictionary import AutoEncoder, Dictionary
from .trainer import ConstrainedAdam, LossLog, SAETrainer, sparsity_schedule, trainer_lr_schedule, upstream_loss_call


def entropy_penalty(f: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The founding README's sparsity penalty: the entropy of each token's codes normalised to sum 1, p = f / sum(f),
    H = -sum p log p (eps-smoothed; 0 for tokens with no active code), averaged over tokens. f: `[batch, dict_size]`."""
    total = f.sum(dim=-1, keepdim=True)  # [batch, 1]
    p = f / (total + eps)
    h = -(p * torch.log(p + eps))
    return torch.where(total > 0, h, torch.zeros_like(h)).sum(dim=-1).mean()


@torch.no_grad()
def resample_dead_neurons(ae: Dictionary, optimizer: torch.optim.Optimizer, deads: torch.Tensor, x: torch.Tensor,
                          y: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Upstream's resampling (after Towards Monosemanticity's appendix) of up to `len(x)` dead neurons (the first
    ones of `deads`, a `[dict_size]` bool mask): tokens are drawn without replacement with probability proportional
    to their reconstruction error |y - ae(x)|; each resampled neuron's encoder row becomes the token's input times
    0.2 times the mean norm of the living encoder rows, its decoder column the token's target at unit norm, its
    encoder bias 0, and Adam's moments for those entries are reset. Returns how many were resampled."""
    dead_ids = deads.nonzero().flatten()
    if dead_ids.numel() == 0:
        return 0
    errors = (y - ae(x)).norm(dim=-1).float()  # [batch]
    n = min(dead_ids.numel(), x.shape[0])
    # every token stays drawable, so a batch with fewer erroneous tokens than dead neurons still works
    tokens = torch.multinomial(errors.clamp_min(1e-30), n, replacement=False, generator=generator)
    chosen = dead_ids[:n]
    alive = ~deads
    rows = ae.encoder.weight[alive] if alive.any() else ae.encoder.weight
    alive_norm = rows.norm(dim=-1).mean()
    ae.encoder.weight[chosen] = x[tokens] * alive_norm * 0.2
    targets = y[tokens]
    ae.decoder.weight[:, chosen] = (targets / targets.norm(dim=-1, keepdim=True).clamp_min(1e-12)).t()
    ae.encoder.bias[chosen] = 0.0
    for param, index in ((ae.encoder.weight, chosen), (ae.encoder.bias, chosen),
                         (ae.decoder.weight, (slice(None), chosen))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
    return n


class ReLUTrainer(SAETrainer):
    """Shared set-up of the trainers of `AutoEncoder`s with upstream's arguments: upstream's schedules, optional
    constrained decoder, dead-neuron resampling state, and upstream's attributes (layer, lm_name, ...)."""

    def __init__(self, steps: int, activation_dim: int, dict_size: int, *, layer: int | None, lm_name: str | None,
                 dict_class: type[Dictionary], lr: float, warmup_steps: int, sparsity_warmup_steps: int | None,
                 decay_start: int | None, resample_steps: int | None, seed: int | None, device: str | None,
                 wandb_name: str, submodule_name: str | None, output_dim: int | None, transcoder: bool, skip: bool,
                 dead_feature_threshold: int, constrained: bool, config: dict[str, Any]):
        if sparsity_warmup_steps is not None and (not isinstance(sparsity_warmup_steps, int)
                                                  or sparsity_warmup_steps < 0):
            raise ValueError(f"sparsity_warmup_steps must be None or an int >= 0, got {sparsity_warmup_steps!r}")
        lr_lambda = trainer_lr_schedule(steps, warmup_steps, decay_start, resample_steps, sparsity_warmup_steps)
        # only pass the transcoder options when used, so dictionary classes with upstream's (activation_dim,
        # dict_size) constructor work too
        widths = {} if (output_dim is None and not transcoder and not skip) else \
            {"output_dim": output_dim, "transcoder": transcoder, "skip": skip}
        super().__init__(
            seed, steps=steps, lr=lr, warmup_steps=warmup_steps, decay_start=decay_start,
            dead_feature_threshold=dead_feature_threshold, device=device, lr_lambda=lr_lambda,
            build_dictionary=lambda: dict_class(activation_dim, dict_size, **widths),
            build_optimizer=(lambda ae: ConstrainedAdam(ae.parameters(), [ae.decoder.weight], lr=lr))
            if constrained else None,
            config={"sparsity_warmup_steps": sparsity_warmup_steps, **config, "layer": layer, "lm_name": lm_name,
                    "wandb_name": wandb_name, "submodule_name": submodule_name},
        )
        self.layer, self.lm_name, self.submodule_name, self.wandb_name = layer, lm_name, submodule_name, wandb_name
        self.warmup_steps, self.decay_start = warmup_steps, decay_start
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self.sparsity_warmup_fn = sparsity_schedule(sparsity_warmup_steps)
        self.resample_steps = resample_steps
        # upstream's count of consecutive steps in which each neuron fired on no token (kept only for resampling)
        self.steps_since_active = (torch.zeros(self.ae.dict_size, dtype=torch.long, device=self.device)
                                   if resample_steps is not None else None)
        # resampling draws from its own generator, so runs (and resumed runs) are reproducible
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))

    @torch.no_grad()
    def _track_codes(self, f: torch.Tensor) -> float:
        """Update dead-neuron counts from codes `[batch, dict_size]`; returns L0."""
        active = f != 0
        fired = active.any(dim=0)
        self._track(fired.nonzero().flatten(), f.shape[0])
        if self.steps_since_active is not None:
            self.steps_since_active[~fired] += 1
            self.steps_since_active[fired] = 0
        return active.sum(dim=-1).float().mean().item()

    def resample_neurons(self, deads: torch.Tensor, activations: Any) -> int:
        """Resample the dead neurons in the `deads` mask from a batch (a tensor, or an (x, y) pair)."""
        x, y = self.batch_tensors(activations)
        return resample_dead_neurons(self.ae, self.optimizer, deads, x, y, self.generator)

    def _resample_due(self, step: int) -> bool:
        return self.resample_steps is not None and step % self.resample_steps == 0

    def update(self, step: int, activations: Any) -> float:
        """One training step; then, every `resample_steps` steps, neurons dead for over half that many steps are
        resampled from this batch."""
        loss = super().update(step, activations)
        if self._resample_due(step):
            self.resample_neurons(self.steps_since_active > self.resample_steps / 2, activations)
        return loss

    def _extra_state(self) -> dict[str, Any]:
        return {"steps_since_active": self.steps_since_active, "generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("steps_since_active") is not None:
            self.steps_since_active.copy_(state["steps_since_active"])
        if "generator" in state:
            self.generator.set_state(state["generator"])


class StandardTrainer(ReLUTrainer):
    """Upstream's original StandardTrainer: trains an `AutoEncoder` (or a transcoder of that class) with a unit-norm
    decoder, an L1 (or, with `entropy`, entropy) penalty and optional dead-neuron resampling."""

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
        l1_penalty: float = 1e-1,
        warmup_steps: int = 1000,
        sparsity_warmup_steps: int | None = 2000,
        decay_start: int | None = None,
        resample_steps: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str | None = "StandardTrainer",
        submodule_name: str | None = None,
        *,
        entropy: bool = False,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip: bool = False,
        dead_feature_threshold: int = 10_000_000,
    ):
        super().__init__(
            steps, activation_dim, dict_size, layer=layer, lm_name=lm_name, dict_class=dict_class, lr=lr,
            warmup_steps=warmup_steps, sparsity_warmup_steps=sparsity_warmup_steps, decay_start=decay_start,
            resample_steps=resample_steps, seed=seed, device=device, wandb_name=wandb_name,
            submodule_name=submodule_name, output_dim=output_dim, transcoder=transcoder, skip=skip,
            dead_feature_threshold=dead_feature_threshold, constrained=True,
            config={"l1_penalty": l1_penalty, "resample_steps": resample_steps, "entropy": bool(entropy)},
        )
        self.l1_penalty, self.entropy = l1_penalty, bool(entropy)

    def sparsity_loss(self, f: torch.Tensor) -> torch.Tensor:
        """The penalty before its coefficient: mean L1 norm of the codes, or their mean entropy."""
        return entropy_penalty(f) if self.entropy else f.norm(p=1, dim=-1).mean()

    def loss(self, x: torch.Tensor, step: int, logging: bool = False, y: torch.Tensor | None = None, **kwargs: Any):
        """Reconstruction + penalty, upstream's call (transcoders pass their target as `y`; `loss(x, y, step)` works
        too). With `logging`, returns upstream's LossLog(x, x_hat, f, losses) and changes no training state."""
        y, step, logging = upstream_loss_call(x, step, logging, y)
        y_hat, f = self.ae(x, output_features=True)
        recon = (y - y_hat).pow(2).sum(dim=-1).mean()
        sparsity = self.sparsity_loss(f)
        loss = recon + self.l1_penalty * self.sparsity_warmup_fn(step) * sparsity
        if logging:
            return LossLog(x, y_hat, f, {"l2_loss": (y - y_hat).norm(dim=-1).mean().item(),
                                         "mse_loss": recon.item(), "sparsity_loss": sparsity.item(),
                                         "loss": loss.item()})
        l0 = self._track_codes(f)
        self._record(y, y_hat.detach(), l0, loss, sparsity_loss=sparsity.item(), mse_loss=recon.item())
        return loss


class StandardTrainerAprilUpdate(ReLUTrainer):
    """Upstream's StandardTrainerAprilUpdate: trains an `AutoEncoder` (or a transcoder of that class) with free
    decoder norms, the decoder-norm-weighted L1 penalty and gradient clipping at norm 1."""

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type[Dictionary] = AutoEncoder,
        lr: float = 1e-3,
        l1_penalty: float = 1e-1,
        warmup_steps: int = 1000,
        sparsity_warmup_steps: int | None = 2000,
        decay_start: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str | None = "StandardTrainerAprilUpdate",
        submodule_name: str | None = None,
        *,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip: bool = False,
        dead_feature_threshold: int = 10_000_000,
    ):
        super().__init__(
            steps, activation_dim, dict_size, layer=layer, lm_name=lm_name, dict_class=dict_class, lr=lr,
            warmup_steps=warmup_steps, sparsity_warmup_steps=sparsity_warmup_steps, decay_start=decay_start,
            resample_steps=None, seed=seed, device=device, wandb_name=wandb_name, submodule_name=submodule_name,
            output_dim=output_dim, transcoder=transcoder, skip=skip, dead_feature_threshold=dead_feature_threshold,
            constrained=False, config={"l1_penalty": l1_penalty},
        )
        self.l1_penalty = l1_penalty
        self.logging_parameters = ["sparsity_coefficient"]
        self.sparsity_coefficient = 0.0

    def loss(self, x: torch.Tensor, step: int, logging: bool = False, y: torch.Tensor | None = None, **kwargs: Any):
        """Reconstruction + l1_penalty * sum_i f_i |W_dec[:, i]|, upstream's call (transcoders pass their target as
        `y`). With `logging`, returns upstream's LossLog(x, x_hat, f, losses) and changes no training state."""
        y, step, logging = upstream_loss_call(x, step, logging, y)
        y_hat, f = self.ae(x, output_features=True)
        recon = (y - y_hat).pow(2).sum(dim=-1).mean()
        l1 = (f * self.ae.decoder.weight.norm(dim=0)).sum(dim=-1).mean()
        coefficient = self.l1_penalty * self.sparsity_warmup_fn(step)
        loss = recon + coefficient * l1
        if logging:
            return LossLog(x, y_hat, f, {"l2_loss": (y - y_hat).norm(dim=-1).mean().item(),
                                         "mse_loss": recon.item(), "sparsity_loss": l1.item(), "loss": loss.item()})
        self.sparsity_coefficient = coefficient
        l0 = self._track_codes(f)
        self._record(y, y_hat.detach(), l0, loss, l1_loss=l1.item(), mse_loss=recon.item())
        return loss

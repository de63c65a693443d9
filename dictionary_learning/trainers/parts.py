"""The mechanics training methods share, each written once: the lr schedule and the sparsity ramp,
dead-feature counts, the AuxK loss, the inference threshold, k annealing, the initial biases, the
unit-norm decoder, p-annealing and dead-neuron resampling. Trainers, SCAE fine-tuning and
end-to-end training compose these; none of them changes state unless its name says so (`update`,
`advance`, `resample`, ...)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..dictionary import Dictionary
from ..sparse import SparseCode, gather_linear, known_linear, sparse_decode
from .decoder import (  # noqa: F401 (parts' names)
    UnitNormDecoder,
    decoder_directions,
    decoder_rows,
    view_grad,
)
from .optim import adam  # noqa: F401 (parts' names)

# AuxK codes dense over the dead columns when k_aux >= this share of the dead latents
DENSE_AUXK_SHARE = 0.1


# --------------------------------------------------------------------------------------------------
# schedules


def lr_schedule(steps: int, warmup_steps: int = 0, decay_start: int | None = None,
                resample_steps: int | None = None) -> Callable[[int], float]:
    """The lr multiplier of step `step` (for LambdaLR), upstream's: `step / warmup_steps` during the
    warmup, then 1, then a linear decay to 0 from `decay_start`; with `resample_steps`, the warmup
    restarts every `resample_steps` steps (after each resampling of dead neurons) and there is no
    decay. A warmup longer than the run is cut to the run (upstream refuses it), so a short run
    still reaches its full lr."""
    if decay_start is not None and not 0 <= decay_start <= steps:
        raise ValueError(f"decay_start must be in [0, steps={steps}], got {decay_start}")
    warmup_steps = min(warmup_steps, steps)

    def factor(step: int) -> float:
        if resample_steps is not None:
            return 1.0 if warmup_steps == 0 else min((step % resample_steps) / warmup_steps, 1.0)
        value = step / warmup_steps if step < warmup_steps else 1.0
        if decay_start is not None and step >= decay_start:
            value = min(value, max(0.0, (steps - step) / max(1, steps - decay_start)))
        return value

    return factor


def sparsity_ramp(warmup_steps: int | None, steps: int | None = None) -> Callable[[int], float]:
    """The sparsity penalty's multiplier: `step / warmup_steps` up to 1 (1 throughout when None or
    0); a ramp longer than the run (`steps`) is cut to the run, as the lr warmup."""
    if warmup_steps and steps is not None:
        warmup_steps = min(warmup_steps, steps)

    def factor(step: int) -> float:
        return 1.0 if not warmup_steps else min(step / warmup_steps, 1.0)

    return factor


def default_topk_lr(dict_size: int) -> float:
    """Gao et al. 2024's scaling: 2e-4 at 2**14 latents, times 1/sqrt(dict_size / 2**14)."""
    return 2e-4 / math.sqrt(dict_size / 2**14)


# --------------------------------------------------------------------------------------------------
# dead features


class DeadFeatures:
    """Per latent, the tokens seen since it last fired (`counts`, upstream's
    `num_tokens_since_fired`); in data-parallel training the tokens of the global batch and the
    latents fired on any rank (`fired` passed in is already global, see `global_fired`)."""

    def __init__(self, dict_size: int, device: torch.device):
        self.counts = torch.zeros(dict_size, dtype=torch.long, device=device)

    def mask(self, threshold: int) -> torch.Tensor:
        """`[dict_size]` bool: latents that have not fired for `threshold` tokens."""
        return self.counts >= threshold

    def mask_after(self, fired: torch.Tensor, n_tokens: int, threshold: int) -> torch.Tensor:
        """`mask(threshold)` as it will be once this batch (`fired` `[dict_size]` bool, `n_tokens`)
        is counted, without counting it: what AuxK uses (upstream counts the batch before its
        AuxK)."""
        return ((self.counts + n_tokens) * ~fired) >= threshold

    @torch.no_grad()
    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.counts += n_tokens
        self.counts[fired] = 0


def global_fired(fired: torch.Tensor, n_tokens: int, sync: Any) -> tuple[torch.Tensor, int]:
    """(latents fired on any rank, tokens of the global batch) in data-parallel training, else as
    given."""
    if sync is None:
        return fired, n_tokens
    return sync.any(fired), n_tokens * sync.world_size


def fired_latents(code: Any, dict_size: int) -> torch.Tensor:
    """`[dict_size]` bool: the latents with a positive value somewhere in a SparseCode."""
    fired = torch.zeros(dict_size, dtype=torch.bool, device=code.cols.device)
    fired[code.cols[code.values > 0]] = True
    return fired


# --------------------------------------------------------------------------------------------------
# AuxK


def auxk_loss(ae: Dictionary, x: torch.Tensor, residual: torch.Tensor, pre: torch.Tensor,
              dead: torch.Tensor, k_aux: int,
              global_mean: Callable[[torch.Tensor], torch.Tensor], row_leaves: bool = False
              ) -> tuple[torch.Tensor, float, RowGradients | None]:
    """(loss, error before normalising, the dead rows' gradients or None) of Gao et al.'s AuxK: the
    k_aux largest pre-activations among the dead latents reconstruct the main reconstruction's
    `residual` (detached), the squared error over the residual's variance (both over the global
    batch). Never over all latents: dense over the dead rows when the codes fill a large share of
    them (two small GEMMs), else only the k_aux gathered codes per row. With `row_leaves` the dead
    latents' encoder rows, biases and decoder rows enter as `RowGradients` leaves, whose gradients
    the caller adds into the parameters' after backward (autograd would build a dense [d_sae, d]
    gradient for each and add it to the main path's); else through autograd.
    (0, -1, None) with no dead latent."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device), -1.0, None
    k_aux = min(k_aux, n_dead)
    dead_ids = dead.nonzero().flatten()
    weight, bias, center = ae._encoder_affine()
    views = (weight, bias, decoder_directions(ae))
    rows = RowGradients(dead_ids, views) if row_leaves else None
    encoder, encoder_bias, decoder = (rows.leaves if rows is not None
                                      else [view[dead_ids] for view in views])
    if DENSE_AUXK_SHARE * n_dead <= k_aux:
        if pre.dtype == x.dtype:  # the dead columns of the encoder GEMM, not computed again
            post = known_linear(x, encoder, encoder_bias, center,
                                pre.index_select(1, dead_ids)).relu()  # [batch, n_dead]
        else:
            centred = x if center is None else x - center
            post = F.linear(centred, encoder, encoder_bias).relu()
        with torch.no_grad():
            top = post.topk(k_aux, dim=-1).indices
            keep = torch.zeros_like(post, dtype=torch.bool).scatter_(1, top, True)
        residual_hat = (post * keep) @ decoder
    else:
        with torch.no_grad():
            values, local = pre.index_select(1, dead_ids).topk(k_aux, dim=-1, sorted=False)
        at = torch.arange(x.shape[0], device=x.device).repeat_interleave(k_aux)
        local = local.flatten()
        code = SparseCode(gather_linear(x, encoder, encoder_bias, at, local, values.flatten(),
                                        center).relu(), at, local, x.shape[0])
        residual_hat = sparse_decode(code, decoder.t())
    return (*normalised_error(residual, residual_hat, global_mean), rows)


class RowGradients:
    """Some rows (`ids`) of parameters (or of transposed views of them) as detached leaves
    (`leaves`); after backward, `add` puts the leaves' gradients into the parameters' own, in place,
    so a loss over a few rows never makes autograd build a dense gradient of the whole parameter and
    add it to another. Only where the caller runs backward and then `add` (`Trainer.update`):
    `torch.autograd.grad` and torch.func transforms see the leaves, not the parameters."""

    def __init__(self, ids: torch.Tensor, views: tuple[torch.Tensor, ...]):
        self.ids, self.views = ids, views
        self.leaves = [view[ids].detach().requires_grad_() for view in views]

    @torch.no_grad()
    def add(self) -> None:
        for view, leaf in zip(self.views, self.leaves):
            if leaf.grad is not None:
                grad = view_grad(view, create=True)
                grad.index_put_((self.ids,), leaf.grad.to(grad.dtype), accumulate=True)


def normalised_error(residual: torch.Tensor, residual_hat: torch.Tensor,
                     global_mean: Callable[[torch.Tensor], torch.Tensor]
                     ) -> tuple[torch.Tensor, float]:
    """(squared error over the residual's variance, the error), in at least float32."""
    dtype = torch.promote_types(residual.dtype, torch.float32)
    residual, residual_hat = residual.to(dtype), residual_hat.to(dtype)
    error = (residual - residual_hat).pow(2).sum(dim=-1).mean()
    with torch.no_grad():  # the residual's variance over the (global) batch
        center = global_mean(residual.mean(dim=0))
        variance = global_mean((residual - center).pow(2).sum(dim=-1).mean()).clamp_min(1e-12)
    return (error / variance).nan_to_num(0.0), error.item()


# --------------------------------------------------------------------------------------------------
# the inference threshold, k annealing, b_dec


@torch.no_grad()
def per_token_threshold(kept: torch.Tensor, global_mean: Callable[[torch.Tensor], torch.Tensor]
                        ) -> torch.Tensor | None:
    """TopK's threshold target: the mean over tokens of each token's smallest positive kept code
    (`kept` `[batch, k]`); tokens with none are left out (upstream counts them as +inf, which would
    set the threshold to inf for good); None when no token has one."""
    smallest = kept.float().masked_fill(kept <= 0, float("inf")).min(dim=1).values
    finite = torch.isfinite(smallest)
    # sums and counts over the global batch
    total = global_mean(torch.where(finite, smallest, 0.0).sum())
    count = global_mean(finite.sum().float())
    return total / count if count > 0 else None


@torch.no_grad()
def batch_threshold(kept: torch.Tensor,
                    global_min: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """BatchTopK's threshold target: the smallest positive code the (global) batch kept, 0 when it
    kept none."""
    active = kept[kept > 0]
    smallest = global_min(active.min().float() if active.numel()
                          else torch.full((), torch.inf, device=kept.device))
    return smallest if torch.isfinite(smallest) else torch.zeros((), device=kept.device)


@torch.no_grad()
def move_threshold(threshold: torch.Tensor, target: torch.Tensor, beta: float) -> None:
    """An exponential moving average (beta) towards `target`; the first target sets the threshold
    (it starts < 0)."""
    target = target.to(threshold.dtype)
    if threshold < 0:
        threshold.copy_(target)
    else:
        threshold.mul_(beta).add_((1 - beta) * target)


@torch.no_grad()
def anneal_k(ae: Dictionary, target_k: int, step: int, anneal_steps: int | None) -> None:
    """k falls linearly from the input width at step 0 to `target_k` at `anneal_steps` (nothing
    when None)."""
    if anneal_steps is None:
        return
    ratio = min(step, anneal_steps) / anneal_steps if anneal_steps else 1.0
    ae.k.fill_(int(ae.activation_dim * (1 - ratio) + target_k * ratio))


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points`
    [n, d]."""
    points = points.float()
    guess = points.mean(dim=0)
    for _ in range(max_iter):
        previous = guess
        weights = 1.0 / (points - guess).norm(dim=1).clamp_min(1e-8)
        guess = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (guess - previous).norm() < tol * (1 + previous.norm()):
            break
    return guess


@torch.no_grad()
def initial_biases(ae: Dictionary, x: torch.Tensor, targets: torch.Tensor) -> None:
    """Before the first step: b_dec at the geometric median of the (global) batch's targets; for a
    transcoder, whose encoder reads x uncentred, also the encoder bias at -W_enc mean(x), so its
    pre-activations start centred as an SAE's do (else the latents facing away from x's mean never
    fire: 54% dead on SmolLM2's MLP)."""
    ae.b_dec.copy_(geometric_median(targets.to(ae.b_dec.device)).to(ae.b_dec.dtype))
    if ae.transcoder:
        weight, bias, _ = ae._encoder_affine()
        bias.copy_(-(weight @ x.mean(dim=0).to(weight)).to(bias.dtype))


# --------------------------------------------------------------------------------------------------
# p-annealing


class PAnnealing:
    """An L_p sparsity penalty whose p steps from `p_start` towards `p_end` at `n_updates` steps
    evenly spaced over [anneal_start, anneal_end] (an update at step s applies from step s + 1). At
    each change of p after the first, the coefficient is rescaled by mean(penalty at the old p) /
    mean(penalty at the new p) over the last `queue_length` steps, so the penalty's size carries
    over (Karvonen et al. 2024; upstream's p_anneal and gated_anneal). State: p, next_p,
    p_step_count, sparsity_coeff, sparsity_queue."""

    def __init__(self, p_start: float, p_end: float, anneal_start: int, anneal_end: int,
                 n_updates: int, queue_length: int, coefficient: float):
        self.p_start, self.p_end, self.n_updates = p_start, p_end, n_updates
        self.update_steps = torch.linspace(anneal_start, anneal_end, n_updates, dtype=int)
        self.p_values = torch.linspace(p_start, p_end, n_updates)
        self.p, self.next_p, self.p_step_count = float(p_start), None, 0
        self.queue_length, self.sparsity_coeff = queue_length, coefficient
        # [penalty at p, penalty at next_p] of recent steps
        self.sparsity_queue: list[list[float]] = []

    def record(self, at_p: float, at_next_p: float | None) -> None:
        """Queue one step's penalty at p and at next_p (skipped when next_p's penalty is undefined:
        None)."""
        if at_next_p is not None:
            self.sparsity_queue = [*self.sparsity_queue, [at_p, at_next_p]][-self.queue_length:]

    def advance(self, step: int) -> None:
        """At the update steps: rescale the coefficient from the queue, then move p one value on."""
        if self.p_step_count >= self.n_updates or step not in self.update_steps:
            return
        if step < self.update_steps[self.p_step_count]:
            return
        if self.next_p is not None and self.sparsity_queue:
            # float32 means, as upstream
            at_p, at_next_p = torch.tensor(self.sparsity_queue).mean(dim=0)
            if at_next_p > 0 and torch.isfinite(at_p) and torch.isfinite(at_next_p):
                self.sparsity_coeff = self.sparsity_coeff * (at_p / at_next_p).item()
        self.p = self.p_values[self.p_step_count].item()
        last = self.p_step_count == self.n_updates - 1
        self.next_p = self.p_end if last else self.p_values[self.p_step_count + 1].item()
        self.p_step_count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p, "next_p": self.next_p, "p_step_count": self.p_step_count,
                "sparsity_coeff": self.sparsity_coeff,
                "sparsity_queue": [list(e) for e in self.sparsity_queue]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("p", "next_p", "p_step_count", "sparsity_coeff"):
            setattr(self, key, state[key])
        self.sparsity_queue = [list(e) for e in state["sparsity_queue"]]


# --------------------------------------------------------------------------------------------------
# dead-neuron resampling


class Resampling:
    """Upstream's dead-neuron resampling (after Towards Monosemanticity's appendix): every `period`
    steps (at steps where `step % period == phase`), neurons that fired on no token for more than
    period / 2 consecutive steps are re-initialised from tokens of the batch drawn with probability
    proportional to their reconstruction error. State: `steps_since_active` and the drawing
    generator (seeded, so runs and resumed runs reproduce)."""

    def __init__(self, period: int, phase: int, dict_size: int, device: torch.device,
                 seed: int | None, generator_device: torch.device):
        self.period, self.phase = period, phase
        self.steps_since_active = torch.zeros(dict_size, dtype=torch.long, device=device)
        self.generator = torch.Generator(device=generator_device)
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))

    @torch.no_grad()
    def count(self, fired: torch.Tensor) -> None:
        self.steps_since_active[~fired] += 1
        self.steps_since_active[fired] = 0

    def due(self, step: int) -> bool:
        return step % self.period == self.phase

    def dead(self) -> torch.Tensor:
        return self.steps_since_active > self.period / 2

    def state_dict(self) -> dict[str, Any]:
        return {"steps_since_active": self.steps_since_active,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_since_active.copy_(state["steps_since_active"].to(self.steps_since_active.device))
        self.generator.set_state(state["generator"])


@torch.no_grad()
def resample_rows(ae: Dictionary, optimizer: torch.optim.Optimizer, deads: torch.Tensor,
                  x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                  zeroed: list[torch.Tensor]) -> int:
    """Re-initialise up to `len(x)` dead neurons (the first of the `deads` mask): tokens drawn
    without replacement with probability proportional to their error |y - ae(x)| (uniformly where
    every error is 0); each neuron's encoder row becomes its token's input times 0.2 times the mean
    norm of the living encoder rows, its decoder column the token's target at unit norm; its entries
    of the `zeroed` per-latent parameters (biases) become 0, and Adam's moments of every changed
    entry are cleared. Returns how many were resampled."""
    dead_ids = deads.nonzero().flatten()
    if dead_ids.numel() == 0:
        return 0
    errors = (y - ae(x)).norm(dim=-1).float().to(generator.device)  # [batch]
    if not errors.sum() > 0:
        errors = torch.ones_like(errors)
    n = min(dead_ids.numel(), x.shape[0])
    tokens = torch.multinomial(errors.clamp_min(1e-30), n, replacement=False,
                               generator=generator).to(x.device)
    chosen = dead_ids[:n]
    encoder, decoder = ae.encoder.weight, ae.decoder.weight
    alive = ~deads
    alive_norm = (encoder[alive] if alive.any() else encoder).norm(dim=-1).mean()
    encoder[chosen] = x[tokens] * alive_norm * 0.2
    targets = y[tokens]
    decoder[:, chosen] = (targets / targets.norm(dim=-1, keepdim=True).clamp_min(1e-12)).t()
    for parameter in zeroed:
        parameter[chosen] = 0.0
    for parameter, dim in ((encoder, 0), (decoder, 1), *((p, 0) for p in zeroed)):
        state = optimizer.state.get(parameter, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in state:
                state[moment].index_fill_(dim, chosen, 0.0)
    return n

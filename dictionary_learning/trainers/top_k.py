"""TopKTrainer (Gao et al. 2024); BatchTopKTrainer and MatryoshkaBatchTopKTrainer build on it.

Loss: squared error summed over the output and averaged over the batch, plus `auxk_alpha` times the
AuxK loss (the k_aux largest pre-activations among dead latents reconstruct the residual, over its
variance; `parts.auxk_loss`). Decoder directions stay at unit norm, the gradient along each removed
before the step; b_dec starts at the geometric median of the first batch's targets; an inference
threshold (the mean over tokens of each token's smallest kept code) is tracked from
`threshold_start_step`; `k_anneal_steps` anneals k from the input width down to `k`. The step never
builds dense [batch, d_sae] codes or code gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..checks import integer
from ..compat.trainer_api import UpdateX, UpstreamTrainerAPI
from ..dictionary import AutoEncoderTopK, SparseCode
from ..sparse import fast_matmul_dtype
from . import parts
from .base import StepOutput, Trainer, TrainerConfig
from .parts import default_topk_lr, geometric_median  # noqa: F401 (upstream's names at this path)

TOPK_POSITIONS = ("steps", "activation_dim", "dict_size", "k", "layer", "lm_name", "dict_class",
                  "lr", "auxk_alpha", "warmup_steps", "decay_start", "threshold_beta",
                  "threshold_start_step", "k_anneal_steps", "seed", "device", "wandb_name",
                  "submodule_name")


def resolve_encoder_dtype(encoder_dtype: Any, device: torch.device) -> torch.dtype | None:
    """The dtype a TopK-style trainer runs its dense encoder GEMM in: None (the activations' own), a
    dtype or its name, or "auto": bfloat16 where the hardware multiplies it fast
    (`sparse.fast_matmul_dtype`), else None."""
    if encoder_dtype is None:
        return None
    if encoder_dtype == "auto":
        fast = fast_matmul_dtype(device)
        return fast if fast != torch.float32 else None
    dtype = getattr(torch, encoder_dtype, None) if isinstance(encoder_dtype, str) else encoder_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError("encoder_dtype must be None, 'auto' or a floating dtype such as "
                         f"torch.bfloat16, got {encoder_dtype!r}")
    return dtype


@dataclasses.dataclass(kw_only=True)
class TopKConfig(TrainerConfig):
    """`lr` None: 2e-4 / sqrt(dict_size / 2^14); `k_aux` None: half the output width;
    `threshold_start_step` None: min(1000, steps // 10) (upstream: 1000), so short runs learn a
    threshold too; `threshold_beta` None: 1 - 1 / min(1000, steps // 10) (upstream: 0.999, the
    same from 10,000 steps), so a short run's threshold averages its last tenth, not its first
    steps (600 steps at 0.999 left BatchTopK's inference L0 at 17 for k 32); `encoder_dtype`
    ("auto", torch.bfloat16, ...): the dtype of the dense encoder GEMM that chooses the active
    latents (their values, every gradient, the weights and Adam stay in the activations' dtype;
    "auto": bfloat16 where that is fast)."""

    k: int
    lr: float | None = None
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None
    threshold_beta: float | None = None
    threshold_start_step: int | None = None
    k_anneal_steps: int | None = None
    encoder_dtype: Any = None
    wandb_name: str | None = "TopKTrainer"

    def __post_init__(self) -> None:
        super().__post_init__()
        integer("k", self.k, 1, self.dict_size, high_name="dict_size")
        if self.lr is None:
            self.lr = default_topk_lr(self.dict_size)
        if self.k_aux is None:
            self.k_aux = (self.output_dim or self.activation_dim) // 2
        if self.threshold_start_step is None:
            self.threshold_start_step = min(1000, self.steps // 10)
        if self.threshold_beta is None:
            self.threshold_beta = 1 - 1 / max(1, min(1000, self.steps // 10))
        if self.k_anneal_steps is not None:
            if isinstance(self.k_anneal_steps, bool) or not isinstance(self.k_anneal_steps, int) \
                    or not 0 < self.k_anneal_steps < self.steps:
                raise ValueError(f"k_anneal_steps must be an int in (0, steps={self.steps}), got "
                                 f"{self.k_anneal_steps!r}")
            if self.activation_dim <= self.k:
                raise ValueError(f"k annealing starts at activation_dim={self.activation_dim}, "
                                 f"which must exceed k={self.k}")
        # a clear error for a bad value
        resolve_encoder_dtype(self.encoder_dtype, torch.device("cpu"))


class TopKTrainer(UpdateX, UpstreamTrainerAPI, Trainer):
    """Trains an `AutoEncoderTopK` (or a transcoder of that class)."""

    Config = TopKConfig
    positions = TOPK_POSITIONS
    default_dict_class = AutoEncoderTopK
    unit_norm_decoder = True
    logging_parameters = ["effective_l0", "dead_features", "pre_norm_auxk_loss"]

    def build_dictionary(self):
        cls = self.cfg.dict_class or self.default_dict_class
        return cls(self.cfg.activation_dim, self.cfg.dict_size, self.cfg.k,
                   **self.dictionary_arguments())

    def setup(self) -> None:
        self.encoder_dtype = resolve_encoder_dtype(self.cfg.encoder_dtype, self.device)
        # b_dec goes to the geometric median of the first batch, once (not when starting from saved
        # weights)
        self.b_dec_initialised = self.cfg.initial_weights is not None
        self.effective_l0 = self.dead_features = self.pre_norm_auxk_loss = -1.0
        parts.anneal_k(self.ae, self.cfg.k, 0, self.cfg.k_anneal_steps)

    @property
    def top_k_aux(self) -> int:  # upstream's name
        return self.cfg.k_aux

    # the step -------------------------------------------------------------------------------------
    def select(self, x: torch.Tensor, pre: torch.Tensor, step: int = 0) -> SparseCode:
        """The batch's codes from its pre-activations `[batch, d_sae]` at `step`: the k largest per
        token (BatchTopK overrides)."""
        return self.ae.sparse_code(x, pre)

    def step_loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepOutput:
        pre = self.ae.pre_activations(x, self.encoder_dtype)  # [batch, d_sae], no grad
        code = self.select(x, pre, step)
        y_hat = self.reconstruct(code, x)
        return self.with_auxk(x, y, pre, code, y_hat, self.reconstruction_loss(y, code, x, y_hat))

    def reconstruct(self, code: SparseCode, x: torch.Tensor) -> torch.Tensor:
        return self.ae.decode_sparse(code, x)

    def reconstruction_loss(self, y: torch.Tensor, code: SparseCode, x: torch.Tensor,
                            y_hat: torch.Tensor
                            ) -> tuple[torch.Tensor, dict[str, float]]:
        mse = (y - y_hat).pow(2).sum(dim=-1).mean()
        return mse, {"mse_loss": mse.item()}

    def with_auxk(self, x: torch.Tensor, y: torch.Tensor, pre: torch.Tensor, code: SparseCode,
                  y_hat: torch.Tensor,
                  reconstruction: tuple[torch.Tensor, dict[str, float]]) -> StepOutput:
        """The StepOutput of a reconstruction loss plus auxk_alpha times AuxK over the latents dead
        once this batch is counted."""
        loss, metrics = reconstruction
        fired = self.global_fired(parts.fired_latents(code, self.ae.dict_size))
        n_tokens = x.shape[0] * (1 if self.distributed is None else self.distributed.world_size)
        dead = self.dead.mask_after(fired, n_tokens, self.cfg.dead_feature_threshold)
        auxk, pre_norm, rows = torch.zeros((), device=x.device), -1.0, None
        if self.cfg.auxk_alpha:
            auxk, pre_norm, rows = parts.auxk_loss(self.ae, x, (y - y_hat).detach(), pre, dead,
                                                   self.cfg.k_aux, self.global_mean,
                                                   row_leaves=self.in_update)
        l0 = (code.values > 0).sum().item() / x.shape[0]
        return StepOutput(loss + self.cfg.auxk_alpha * auxk, y_hat, fired, l0,
                          {**metrics, "auxk_loss": auxk.item()},
                          {"code": code, "dead_features": int(dead.sum()),
                           "pre_norm_auxk_loss": pre_norm, "row_gradients": rows})

    def before_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if step == 0 and not self.b_dec_initialised:
            targets = self.global_rows(y)  # (an SAE's are its inputs: gathered once)
            parts.initial_biases(self.ae, targets if y is x else self.global_rows(x), targets)
            self.b_dec_initialised = True

    def after_step(self, step: int, x: torch.Tensor, y: torch.Tensor, out: StepOutput) -> None:
        super().after_step(step, x, y, out)
        if step > self.cfg.threshold_start_step:
            self.move_threshold(out.state["code"].values, x.shape[0])
        # upstream's: step t + 1 uses k(t)
        parts.anneal_k(self.ae, self.cfg.k, step, self.cfg.k_anneal_steps)
        self.effective_l0, self.dead_features = out.l0, out.state["dead_features"]
        self.pre_norm_auxk_loss = out.state["pre_norm_auxk_loss"]

    def move_threshold(self, kept: torch.Tensor, n_rows: int) -> None:
        """The inference threshold one moving-average step towards its target on a batch's kept
        codes."""
        target = self.threshold_target(kept.detach(), n_rows)
        if target is not None:
            parts.move_threshold(self.ae.threshold, target, self.cfg.threshold_beta)

    def threshold_target(self, kept: torch.Tensor, n_rows: int) -> torch.Tensor | None:
        """The mean over tokens of each token's smallest kept code (BatchTopK: the batch's
        smallest)."""
        return parts.per_token_threshold(kept.reshape(n_rows, -1), self.global_mean)

    def config_values(self) -> dict[str, Any]:
        name = str(self.encoder_dtype).removeprefix("torch.") if self.encoder_dtype else None
        # (upstream's name)
        return {**super().config_values(), "encoder_dtype": name, "top_k_aux": self.cfg.k_aux}

    def extra_state(self) -> dict[str, Any]:
        return {"b_dec_initialised": self.b_dec_initialised}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.b_dec_initialised = state.get("b_dec_initialised", False)

    # upstream's API -------------------------------------------------------------------------------
    # upstream's BatchTopKTrainer.geometric_median
    geometric_median = staticmethod(geometric_median)

    def update_threshold(self, top_acts_BK: torch.Tensor) -> None:
        """Upstream's threshold update from a batch's kept codes `[batch, k]`."""
        self.move_threshold(top_acts_BK, top_acts_BK.shape[0])

    def update_annealed_k(self, step: int, activation_dim: int,
                          k_anneal_steps: int | None = None) -> None:
        """Upstream's k annealing: k falls linearly from the input width to `k` over
        `k_anneal_steps`."""
        parts.anneal_k(self.ae, self.cfg.k, step, k_anneal_steps)

    def get_auxiliary_loss(self, residual_BD: torch.Tensor,
                           post_relu_acts_BF: torch.Tensor) -> torch.Tensor:
        """Upstream's AuxK from dense post-relu codes `[batch, d_sae]` (differentiable
        through them), over the latents dead now: the training step computes the same quantity
        sparsely."""
        dead = self.dead.mask(self.cfg.dead_feature_threshold)
        self.dead_features = int(dead.sum())
        if self.dead_features == 0:
            self.pre_norm_auxk_loss = -1
            return torch.zeros((), dtype=residual_BD.dtype, device=residual_BD.device)
        k_aux = min(self.cfg.k_aux, self.dead_features)
        with torch.no_grad():
            cols = (post_relu_acts_BF.masked_fill(~dead, -torch.inf)
                    .topk(k_aux, dim=-1, sorted=False).indices)
        n = post_relu_acts_BF.shape[0]
        rows = torch.arange(n, device=cols.device).repeat_interleave(k_aux)
        code = SparseCode(post_relu_acts_BF.gather(1, cols).flatten(), rows, cols.flatten(), n)
        residual_hat = self.ae.decode_sparse(code, bias=False)
        loss, self.pre_norm_auxk_loss = parts.normalised_error(residual_BD, residual_hat,
                                                               self.global_mean)
        return loss

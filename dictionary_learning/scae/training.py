"""Fine-tuning a suite through the pruned forward pass: `SCAETrainer` (one step on local MSE and
downstream CE) and `train_scae_suite` (the package's training loop, `training.run_steps`, over
batches of texts)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..checks import finite_hyperparameters, integer, split_options
from ..checks import options as options_of
from ..checks import texts as check_texts
from ..files import writer_lock
from ..models import torch_model
from ..tracing import masked_cross_entropy, next_token_kl, tokenize
from ..trainers.parts import (
    DeadFeatures,
    adam,
    decoder_rows,
    default_topk_lr,
    lr_schedule,
    normalised_error,
)
from ..training import CHECKPOINT, Checkpoints, Logger, RunOptions, run_steps, start_wandb
from .pruned import pruned_forward, virtual_weights
from .suite import Connections, SCAESuite, parameter_fingerprint
from .tracing import clean_targets, patched_logits, run_suite

default_lr = default_topk_lr  # the reference fork's size-scaled learning rate, as TopK's


@dataclasses.dataclass
class SCAEConfig:
    """The fine-tuner's hyperparameters (see `SCAETrainer`)."""

    steps: int
    lr: float | None = None
    mse_weight: float = 1.0
    ce_weight: float = 1.0
    kl_weight: float = 0.0
    warmup_steps: int = 0
    decay_start: float | None = 0.8
    stagger_steps: int = 0
    auxk_alpha: float = 1 / 32
    dead_feature_threshold: int = 1_000_000
    ctx_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        integer("steps", self.steps)
        weights = {"mse_weight": self.mse_weight, "ce_weight": self.ce_weight,
                   "kl_weight": self.kl_weight, "auxk_alpha": self.auxk_alpha}
        for name, value in weights.items():
            if not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        finite_hyperparameters("SCAETrainer", {"lr": self.lr})
        if self.mse_weight + self.ce_weight + self.kl_weight == 0:
            raise ValueError("mse_weight, ce_weight and kl_weight must not all be 0, got "
                             f"{self.mse_weight}, {self.ce_weight}, {self.kl_weight}")
        if self.decay_start is not None and not (isinstance(self.decay_start, (int, float))
                                                 and 0 <= self.decay_start <= 1):
            raise ValueError(f"decay_start must be a fraction of the steps in [0, 1] or None, got "
                             f"{self.decay_start!r}")
        integer("stagger_steps", self.stagger_steps, 0)
        integer("dead_feature_threshold", self.dead_feature_threshold)


class SCAETrainer:
    """Fine-tunes a suite through the pruned forward pass on local MSE (each module's pruned
    reconstruction against the clean model's attention / MLP output, as a fraction of its variance,
    summed over modules), downstream CE and / or KL(clean || patched) (every pruned reconstruction
    patched into the model in one nnsight trace, backpropagated into the suite), and AuxK on each
    module's dead features. The linearisation (norm scales, attention patterns) is that of the run
    with the dense suite patched in, taken without gradient each step; the virtual weights are
    recomputed from the current parameters. Configured by an `SCAEConfig` (`config=`) or its
    fields as keywords (`steps` also positionally).

    As the reference SCAE fork: Adam with one learning rate per module (`lr=None`: 2e-4 /
    sqrt(d_sae / 2^14)), linear warmup over `warmup_steps` and linear decay to 0 from
    `decay_start` (a fraction of the steps; None: no decay), module p's (in suite order) MSE term
    switched on after p * `stagger_steps` steps, and dead features (not fired for
    `dead_feature_threshold` tokens) fitted to each module's residual through AuxK (`auxk_alpha`,
    the top `k_aux` dead pre-activations, k_aux = d_model / 2 as for TopK SAEs)."""

    def __init__(self, suite: SCAESuite, model: Any, connections: Connections,
                 steps: int | None = None, *, config: SCAEConfig | None = None, **options: Any):
        if steps is not None:
            options["steps"] = steps
        cfg = self.cfg = options_of(SCAEConfig, config, options, "SCAETrainer")
        suite.check_model(model)
        # fine-tuning recomputes the weights from the indices
        connections.validate(suite, model, weights=False)
        torch.manual_seed(cfg.seed)
        self.suite, self.model, self.connections = suite, model, connections
        for parameter in torch_model(model).parameters():
            parameter.requires_grad_(False)  # only the suite trains
        self.lrs = {name: default_lr(suite[name].d_sae) if cfg.lr is None else cfg.lr
                    for name in suite.names}
        self.optimizer = adam([{"params": list(suite[name].parameters()), "lr": self.lrs[name]}
                               for name in suite.names], next(iter(self.lrs.values())))
        self.decoder_norms = {name: module.decoder.weight.detach().norm(dim=0, keepdim=True).clone()
                              for name, module in suite.dictionaries.items()}
        decay_step = None if cfg.decay_start is None else int(cfg.decay_start * cfg.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_schedule(cfg.steps, cfg.warmup_steps,
                                                                       decay_step))
        self.dead = {name: DeadFeatures(suite[name].d_sae,
                                        next(suite[name].parameters()).device)
                     for name in suite.names}
        self.config = {**dataclasses.asdict(cfg), "lrs": self.lrs}
        self.last_metrics: dict[str, float] = {}

    @property
    def num_tokens_since_fired(self) -> dict[str, torch.Tensor]:
        return {name: dead.counts for name, dead in self.dead.items()}

    def _auxk(self, name: str, pre: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """AuxK of one module: its dead features' top pre-activations fitted to the residual, as a
        fraction of the residual's variance (0 when none is dead)."""
        dead = self.dead[name].mask(self.cfg.dead_feature_threshold).nonzero().flatten()
        if dead.numel() == 0 or self.cfg.auxk_alpha == 0:
            return pre.new_zeros(())
        k_aux = min(int(dead.numel()), max(1, residual.shape[-1] // 2))
        candidates = pre[:, dead].relu()  # [tokens, n_dead]
        values, chosen = candidates.topk(k_aux, dim=-1)
        codes = torch.zeros_like(candidates).scatter(-1, chosen, values)
        fitted = codes @ decoder_rows(self.suite[name], dead)  # W_dec f without bias
        return normalised_error(residual, fitted, lambda value: value)[0]

    def step_loss(self, texts: list[str], step: int | None = None
                  ) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor], int]:
        """(loss, metrics, the latents each module fired, the batch's real tokens) of a batch of
        texts, changing no state (at `step`, for the staggered MSE terms; None: all on)."""
        suite, model = self.suite, self.model
        encoding = tokenize(model.tokenizer, texts, self.cfg.ctx_len)
        record, _ = run_suite(suite, model, encoding, logits=False)
        targets = clean_targets(suite, model, encoding, logits=self.cfg.kl_weight > 0)
        pre: dict[str, torch.Tensor] = {}
        codes = pruned_forward(suite, model, record, self.connections, recompute_weights=True,
                               pre_activations=pre)
        mask = record.mask
        mse, auxk = torch.zeros((), device=mask.device), torch.zeros((), device=mask.device)
        fired = {}
        for position, name in enumerate(suite.names):
            target = targets[name][mask]
            reconstruction = suite[name].decode(codes[name][mask])
            error = ((reconstruction - target).pow(2).sum()
                     / (target - target.mean(0)).pow(2).sum().clamp_min(1e-12))
            if step is None or step >= position * self.cfg.stagger_steps:
                mse = mse + error
            auxk = auxk + self._auxk(name, pre[name][mask], (target - reconstruction).detach())
            fired[name] = (codes[name][mask] > 0).any(dim=0).detach()
        loss = self.cfg.mse_weight * mse + self.cfg.auxk_alpha * auxk
        metrics = {"fvu_sum": mse.item(), "auxk": auxk.item(),
                   "l0": sum((codes[n][mask] > 0).sum(-1).float().mean().item()
                             for n in suite.names) / len(suite.names)}
        if self.cfg.ce_weight or self.cfg.kl_weight:
            patched = patched_logits(suite, model, encoding, codes)
            ce, ce_mask = masked_cross_entropy(patched, encoding["input_ids"],
                                               encoding["attention_mask"])
            ce = ce[ce_mask].mean()
            loss = loss + self.cfg.ce_weight * ce
            metrics["ce"] = ce.item()
            if self.cfg.kl_weight:
                kl = next_token_kl(targets["logits"], patched)
                kl = kl[encoding["attention_mask"].bool().to(kl.device)].mean()
                loss = loss + self.cfg.kl_weight * kl
                metrics["kl"] = kl.item()
        return loss, metrics, fired, int(mask.sum())

    def loss(self, texts: list[str], step: int | None = None) -> torch.Tensor:
        """The training loss on a batch of texts (at `step`, for the staggered MSE terms; None: all
        on)."""
        return self.step_loss(texts, step)[0]

    def update(self, step: int, texts: list[str]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics, fired, n_tokens = self.step_loss(texts, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.suite.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        # keep each decoder column at its starting norm (unit for TopK-trained modules,
        # c_in / c_out for transcoders whose training normalisation was folded in)
        with torch.no_grad():
            for name, module in self.suite.dictionaries.items():
                weight = module.decoder.weight
                weight *= (self.decoder_norms[name]
                           / weight.norm(dim=0, keepdim=True).clamp_min(1e-8))
        for name, dead in self.dead.items():  # dead-feature tracking over the batch's real tokens
            dead.update(fired[name], n_tokens)
        n_dead = sum(int(dead.mask(self.cfg.dead_feature_threshold).sum())
                     for dead in self.dead.values())
        self.last_metrics = {"loss": loss.item(), **metrics, "dead": n_dead}
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {"suite": self.suite.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "num_tokens_since_fired": self.num_tokens_since_fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.suite.load_state_dict(state["suite"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, counts in state["num_tokens_since_fired"].items():
            self.dead[name].counts.copy_(counts)


def text_batches(texts: Iterable[str], batch_texts: int) -> Iterator[list[str]]:
    """Consecutive lists of `batch_texts` texts (the last may be shorter), until the texts run
    out."""
    texts = iter(texts)
    return iter(lambda: list(itertools.islice(texts, batch_texts)), [])


# the training run's options (`training.RunOptions` fields) a fine-tuning run takes
RUN_FIELDS = ("save_dir", "checkpoint_steps", "resume", "log_steps", "use_wandb", "wandb_project",
              "progress", "keep_checkpoint")


def train_scae_suite(suite: SCAESuite, model: Any, texts: Any, connections: Connections, steps: int,
                     batch_texts: int = 8, **options: Any) -> SCAETrainer:
    """Fine-tune `suite` for `steps` steps on batches of `batch_texts` texts from the iterator
    `texts`. `options` are the `SCAEConfig` fields (the trainer's hyperparameters) and the run's: a
    tqdm bar (`progress`), wandb logging every `log_steps` steps (`use_wandb`, `wandb_project`;
    $WANDB_MODE, offline by default), atomic checkpoints in `save_dir` (every `checkpoint_steps`
    steps) and `resume=True` continuing from the last one (the consumed text batches are skipped).
    At the end the suite's `connections` hold the tuned connections' virtual weights, and the suite
    (with them) is saved to `save_dir/suite`, and the checkpoint is deleted unless
    `keep_checkpoint`. The scores and totals are those of the selection, before fine-tuning."""
    trainer_fields = [f.name for f in dataclasses.fields(SCAEConfig) if f.name != "steps"]
    trainer_options, run_options = split_options(options, [trainer_fields, list(RUN_FIELDS)],
                                                 "train_scae_suite")
    run = RunOptions(**run_options)
    integer("batch_texts", batch_texts)  # 0 would train nothing
    texts = check_texts("texts", texts)
    trainer = SCAETrainer(suite, model, connections, steps=steps, **trainer_options)
    batches = text_batches(texts, batch_texts)
    save_dir = Path(run.save_dir) if run.save_dir is not None else None
    with writer_lock(save_dir, "training run folder") if save_dir is not None else nullcontext():
        checkpoints = Checkpoints(save_dir / CHECKPOINT if save_dir is not None else None,
                                  run.checkpoint_steps, steps)
        state = checkpoints.resume([trainer], batches, run.resume)
        wandb_run = (start_wandb(trainer.config, save_dir,
                                 project=run.wandb_project or "dictionary_learning")
                     if run.use_wandb else None)
        logger = Logger(desc="fine-tuning suite", progress=run.progress, every=run.log_steps,
                        run=wandb_run)
        done = run_steps([trainer], batches, steps, state["step"], state["batches_consumed"],
                         checkpoints=checkpoints, logger=logger)
        if done == 0:  # never save an untuned suite as tuned
            raise ValueError("texts yielded no batches: the suite was not fine-tuned")
        with torch.no_grad():  # the virtual weights of the fine-tuned parameters
            tuned = {name: virtual_weights(suite, model, name, idx)
                     for name, idx in connections.indices.items()}
            suite.connections = Connections(connections.indices, tuned, connections.scores,
                                            connections.totals,
                                            fingerprint=parameter_fingerprint(suite))
        if save_dir is not None:
            suite.save(save_dir / "suite")
            if not run.keep_checkpoint:
                checkpoints.path.unlink(missing_ok=True)  # the run is complete in the saved suite
    return trainer

"""Fine-tuning a suite through the pruned forward pass: `SCAETrainer` (one step on local MSE and downstream CE) and
`train_scae_suite` (the package's training loop, `training.run_steps`, over batches of texts)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..checks import integer, texts as check_texts
from ..evaluation import masked_cross_entropy
from ..models import torch_model
from ..tracing import tokenize
from ..trainers.trainer import check_steps, lr_schedule
from ..training import CHECKPOINT, resume_from_checkpoints, run_steps, start_wandb
from .pruned import pruned_forward, virtual_weights
from .suite import Connections, SCAESuite
from .tracing import clean_targets, patched_logits, run_suite


class SCAETrainer:
    """Fine-tunes a suite through the pruned forward pass on local MSE (each module's pruned reconstruction against
    the clean model's attention / MLP output, as a fraction of its variance, summed over modules) and downstream CE
    (every pruned reconstruction patched into the model in one nnsight trace, CE backpropagated into the suite).
    The linearisation (norm scales, attention patterns) is that of the run with the dense suite patched in, taken
    without gradient each step; the virtual weights are recomputed from the current parameters."""

    def __init__(self, suite: SCAESuite, model: Any, connections: Connections, steps: int, lr: float = 1e-4,
                 mse_weight: float = 1.0, ce_weight: float = 1.0, warmup_steps: int = 0, ctx_len: int = 128,
                 seed: int = 0):
        check_steps(steps)
        if mse_weight < 0 or ce_weight < 0 or mse_weight + ce_weight == 0:
            raise ValueError(f"mse_weight and ce_weight must be >= 0 and not both 0, got {mse_weight}, {ce_weight}")
        suite.check_model(model)
        connections.validate(suite, model)
        torch.manual_seed(seed)
        self.suite, self.model, self.connections = suite, model, connections
        self.mse_weight, self.ce_weight, self.ctx_len = mse_weight, ce_weight, ctx_len
        for parameter in torch_model(model).parameters():
            parameter.requires_grad_(False)  # only the suite trains
        self.optimizer = torch.optim.Adam(suite.parameters(), lr=lr)
        self.decoder_norms = {name: module.decoder.weight.detach().norm(dim=0, keepdim=True).clone()
                              for name, module in suite.dictionaries.items()}
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(steps, warmup_steps))
        self.config = {"steps": steps, "lr": lr, "mse_weight": mse_weight, "ce_weight": ce_weight,
                       "warmup_steps": warmup_steps, "ctx_len": ctx_len, "seed": seed}
        self.last_metrics: dict[str, float] = {}

    def loss(self, texts: list[str]) -> torch.Tensor:
        suite, model = self.suite, self.model
        encoding = tokenize(model.tokenizer, texts, self.ctx_len)
        record, _ = run_suite(suite, model, encoding, logits=False)
        targets = clean_targets(suite, model, encoding)
        codes = pruned_forward(suite, model, record, self.connections, recompute_weights=True)
        mask = record.mask
        mse = torch.zeros((), device=record.mask.device)
        for name in suite.names:
            target = targets[name][mask]
            error = (suite[name].decode(codes[name][mask]) - target).pow(2).sum()
            mse = mse + error / (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = self.mse_weight * mse
        metrics = {"fvu_sum": mse.item(), "l0": sum((codes[n][mask] > 0).sum(-1).float().mean().item()
                                                     for n in suite.names) / len(suite.names)}
        if self.ce_weight:
            ce, ce_mask = masked_cross_entropy(patched_logits(suite, model, encoding, codes),
                                               encoding["input_ids"], encoding["attention_mask"])
            ce = ce[ce_mask].mean()
            loss = loss + self.ce_weight * ce
            metrics["ce"] = ce.item()
        self.last_metrics = {"loss": loss.item(), **metrics}
        return loss

    def update(self, step: int, texts: list[str]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(texts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.suite.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():  # keep each decoder column at its starting norm (unit for TopK-trained modules,
            # c_in / c_out for transcoders whose training normalisation was folded in)
            for name, module in self.suite.dictionaries.items():
                weight = module.decoder.weight
                weight *= self.decoder_norms[name] / weight.norm(dim=0, keepdim=True).clamp_min(1e-8)
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {"suite": self.suite.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.suite.load_state_dict(state["suite"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def text_batches(texts: Iterable[str], batch_texts: int) -> Iterator[list[str]]:
    """Consecutive lists of `batch_texts` texts (the last may be shorter), until the texts run out."""
    texts = iter(texts)
    return iter(lambda: list(itertools.islice(texts, batch_texts)), [])


def train_scae_suite(suite: SCAESuite, model: Any, texts: Any, connections: Connections, steps: int,
                     batch_texts: int = 8, save_dir: str | Path | None = None, checkpoint_steps: int | None = None,
                     resume: bool = False, log_steps: int | None = None, use_wandb: bool = False,
                     wandb_project: str = "dictionary_learning", progress: bool = True, **trainer_kwargs
                     ) -> SCAETrainer:
    """Fine-tune `suite` for `steps` steps on batches of `batch_texts` texts from the iterator `texts`, with a tqdm
    bar, optional wandb logging ($WANDB_MODE, offline by default), atomic checkpoints in `save_dir` and
    `resume=True` continuing from the last one (the consumed text batches are skipped). At the end the suite's
    `connections` hold the tuned connections' virtual weights, and the suite (with them) is saved to
    `save_dir/suite`. The scores and totals are those of the selection, before fine-tuning."""
    integer("batch_texts", batch_texts)  # 0 would train nothing
    texts = check_texts("texts", texts)
    trainer = SCAETrainer(suite, model, connections, steps, **trainer_kwargs)
    batches = text_batches(texts, batch_texts)
    save_dir = Path(save_dir) if save_dir is not None else None
    checkpoint = save_dir / CHECKPOINT if save_dir is not None else None
    state = resume_from_checkpoints([trainer], checkpoint, batches, resume)
    run = start_wandb(trainer.config, save_dir, project=wandb_project) if use_wandb else None
    done = run_steps([trainer], batches, steps, start=state["step"], consumed=state["batches_consumed"],
                     checkpoint_path=checkpoint, checkpoint_steps=checkpoint_steps, log_steps=log_steps,
                     log_values=lambda: trainer.last_metrics, run=run, desc="fine-tuning suite", progress=progress)
    if done == 0:  # never save an untuned suite as tuned
        raise ValueError("texts yielded no batches: the suite was not fine-tuned")
    with torch.no_grad():  # the virtual weights of the fine-tuned parameters
        suite.connections = Connections(connections.indices, {name: virtual_weights(suite, model, name, idx)
                                                              for name, idx in connections.indices.items()},
                                        connections.scores, connections.totals)
    if save_dir is not None:
        suite.save(save_dir / "suite")
    return trainer

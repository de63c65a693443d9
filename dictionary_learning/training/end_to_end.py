"""End-to-end training: a dictionary trained (or fine-tuned) on what the model does with its
reconstruction, the KL divergence of the patched next-token distribution from the clean one and / or
the patched CE, optionally mixed with the trainer's own local loss (Braun et al. 2024, e2e_sae's
"e2e + downstream"; sparsify's `loss_fn = kl | ce`).

Each step takes a batch of texts: one trace of the clean model (no grad) gives its logits and the
hook point's values; one trace with the dictionary's reconstruction written into the hook point (as
`evaluation.patched_losses` patches it) gives the patched logits, differentiable in the dictionary's
parameters only (the model's are left out of that pass's graph, and their requires_grad flags
restored after it). The trainer then makes its usual step on the clean values at the patched
positions, with the loss

    kl_weight * KL(clean || patched) + ce_weight * CE(patched) + local_weight * (the trainer's own
                                                                                 loss) / V

where V is the batch's total variance of the reconstruction's target (the mean squared distance of
its values from their mean; `normalize_local=False`: V = 1, raw activation units). With V, an MSE
local loss is the fraction of variance unexplained, so `local_weight` means the same at every hook
point and in every model, next to a KL of order 0.1-1 nats; in raw units a residual stream's MSE is
in the hundreds. (A term the trainer already normalises, such as TopK's AuxK, is divided by V too.)
The trainer's optimizer, schedules, dead-feature tracking, thresholds, checkpoints and resume are
the trainer's own. With local_weight 0 only structurally sparse dictionaries (TopK,
BatchTopK, Matryoshka) stay sparse: a penalty-based trainer's sparsity penalty is part of its local
loss.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import torch

from ..checks import texts as check_texts
from ..dictionary import apply_to_values
from ..models import HookPoint, buffer_io, torch_model
from ..tracing import masked_cross_entropy, next_token_kl, run, token_mask, tokenize


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """The model's parameters out of autograd while the patched pass builds its graph (so no
    gradient reaches them, and none is computed), restored afterwards: the user's model is left as
    it was."""
    parameters = [p for p in torch_model(model).parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


class EndToEnd:
    """Wraps a trainer so that `update(step, texts)` trains its dictionary end to end on `model` at
    `hooks` (`(point,)` for an SAE, `(input_side, output_side)` for a transcoder). Everything else
    (`ae`, `config`, `state_dict`, ...) is the trainer's."""

    def __init__(self, trainer: Any, model: Any, hooks: tuple[HookPoint, ...] | HookPoint,
                 kl_weight: float = 1.0, ce_weight: float = 0.0, local_weight: float = 0.0,
                 ctx_len: int = 128, remove_bos: bool = True, normalize_local: bool = True):
        hooks = (hooks,) if isinstance(hooks, HookPoint) else tuple(hooks)
        if not 1 <= len(hooks) <= 2 or not all(isinstance(h, HookPoint) for h in hooks):
            raise TypeError("hooks must be a HookPoint, (point,) or (input_side, output_side)")
        if not callable(getattr(trainer, "step_loss", None)):
            raise TypeError("end-to-end training needs one of this toolkit's trainers (a "
                            "trainers.Trainer, whose update takes an extra_loss), got "
                            f"{type(trainer).__name__}")
        if trainer.ae.transcoder != (len(hooks) == 2):
            needs = ("an (input_side, output_side) pair" if trainer.ae.transcoder
                     else "one hook point")
            raise ValueError(f"a {'transcoder' if trainer.ae.transcoder else 'SAE'} needs "
                             f"{needs}, got {len(hooks)}")
        weights = {"kl_weight": kl_weight, "ce_weight": ce_weight, "local_weight": local_weight}
        for name, value in weights.items():
            if not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if kl_weight + ce_weight == 0:
            raise ValueError("an end-to-end run needs kl_weight > 0 or ce_weight > 0 (else it is a "
                             "local run)")
        self.trainer, self.model, self.hooks = trainer, model, hooks
        self.kl_weight, self.ce_weight, self.local_weight = (float(kl_weight), float(ce_weight),
                                                             float(local_weight))
        if not isinstance(normalize_local, bool):
            raise TypeError(f"normalize_local must be True or False, got {normalize_local!r}")
        self.ctx_len, self.remove_bos, self.normalize_local = ctx_len, remove_bos, normalize_local
        self.settings = {**weights, "ctx_len": ctx_len, "remove_bos": remove_bos,
                         "normalize_local": normalize_local,
                         "hooks": [{"path": h.path, "io": h.io, "name": h.name} for h in hooks]}

    def __getattr__(self, name: str) -> Any:  # only for names the wrapper itself lacks
        trainer = self.__dict__.get("trainer")
        if trainer is None:  # half-built (copy, unpickling)
            raise AttributeError(name)
        return getattr(trainer, name)

    @property
    def config(self) -> dict[str, Any]:
        return {**self.trainer.config, "end_to_end": self.settings}

    @property
    def data_config(self) -> dict[str, Any]:
        """Where the dictionary reads and writes, in a buffer config's keys (saved as config.json's
        `buffer`, as a dictionary trained on a buffer's activations would be, so exports and
        dashboards find its hook points)."""
        names = [str(hook) for hook in self.hooks]
        return {"io": buffer_io([hook.io for hook in self.hooks]),
                "submodule": names if len(names) == 2 else names[0],
                "hooks": self.settings["hooks"], "ctx_len": self.ctx_len,
                "remove_bos": self.remove_bos, "texts": "end_to_end"}

    def clean(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """One batch of texts through the clean model (no grad): its logits and the hook points'
        values."""
        encoding = tokenize(self.model.tokenizer, list(check_texts("texts", texts)), self.ctx_len)
        values, logits = run(self.model, encoding, read=self.hooks)
        source, target = values[0], values[-1]
        return {"encoding": encoding, "logits": logits, "source": source, "target": target,
                "mask": token_mask(encoding, self.remove_bos).to(source.device)}

    def downstream_loss(self,
                        batch: list[str] | dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """kl_weight * KL + ce_weight * CE of the run with the dictionary's reconstruction patched
        in, differentiable in the dictionary (batch: texts, or `clean(texts)`); and the batch's
        values with its kl and ce."""
        values = batch if isinstance(batch, dict) else self.clean(batch)
        encoding = values["encoding"]
        with frozen(self.model):
            reconstruct = partial(apply_to_values, self.trainer.ae)
            patched = run(self.model, encoding, patch={self.hooks: reconstruct}, grad=True,
                          mask=values["mask"]).logits
        attention = encoding["attention_mask"].to(patched.device).bool()
        kl = next_token_kl(values["logits"], patched)[attention].mean()
        ce, pairs = masked_cross_entropy(patched, encoding["input_ids"], encoding["attention_mask"])
        ce = ce[pairs].mean()
        return self.kl_weight * kl + self.ce_weight * ce, {**values, "kl": kl.item(),
                                                           "ce": ce.item()}

    def update(self, step: int, texts: list[str]) -> float:
        """One step on a batch of texts; returns the total loss."""
        values = self.clean(texts)
        mask = values["mask"]
        x, target = values["source"][mask], values["target"][mask]
        batch = (x, target) if len(self.hooks) == 2 else x
        variance = 1.0
        if self.normalize_local:
            target = target.double()
            variance = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12).item()
        trainer, measured = self.trainer, {}

        # the trainer's StepOutput -> the loss to backpropagate
        def combined(out: Any) -> torch.Tensor:
            local = out.loss / variance
            downstream, result = self.downstream_loss(values)
            measured.update(kl=result["kl"], ce=result["ce"], local=local.item())
            return self.local_weight * local + downstream

        # the trainer's own step (optimizer, schedules, tracking) on the combined loss
        total = trainer.update(step, batch, extra_loss=combined)
        trainer.last_metrics = {**trainer.last_metrics, **measured, "loss": total}
        return total

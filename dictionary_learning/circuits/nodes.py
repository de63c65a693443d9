"""Node effects: how much each feature and each dictionary's error, at each position, moves a
metric when its value goes from the clean prompt's to the patch prompt's (Marks et al. 2024,
Sparse Feature Circuits), through nnsight (`tracing.run`) on today's nnsight.

- attribution patching (first order): effect = (patch - clean) * d metric / d node at the clean
  run, every site spliced in (see `sites.py` for the gradient convention);
- integrated gradients (`method="ig"`, `steps`; `ig_rule` "midpoint" alpha = (i + 1/2) / steps,
  or "left", alpha = i / steps, feature-circuits' rule): per site, the gradient averaged along the
  straight path from the clean to the patch values of that site's features and error (the other
  sites left as the model computes them), times (patch - clean). Its effects at a site sum to the
  true effect of patching the whole site as the steps grow.

`errors="zero"` finds the circuit of the replacement model instead, every site's value its
dictionary's reconstruction (its error nodes zero; `sites.py`).

`patch=None` patches every node to zero (zero ablation: a site's value becomes decode(0), the
decoder bias). The default metric is the logit difference at the last position, patch answer
minus clean answer, as the paper's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import tracing
from .sites import Site, SiteValues, as_sites, check_errors, splice

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, seq, vocab] -> [batch]
METHODS = ("attribution", "ig")
IG_RULES = {"midpoint": 0.5, "left": 0.0}  # where in each of the steps the gradient is taken


def logit_difference(clean_answers: torch.Tensor, patch_answers: torch.Tensor) -> Metric:
    """m(logits) = logits[-1, patch answer] - logits[-1, clean answer], per example `[batch]`."""
    clean_answers, patch_answers = torch.as_tensor(clean_answers), torch.as_tensor(patch_answers)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        last = last.float() if last.dtype in (torch.float16, torch.bfloat16) else last
        rows = torch.arange(last.shape[0], device=last.device)
        return (last[rows, patch_answers.to(last.device)]
                - last[rows, clean_answers.to(last.device)])

    return metric


def as_encoding(tokens: Any, name: str = "clean") -> dict[str, torch.Tensor]:
    """An encoding from token ids `[batch, seq]` (or an encoding dict) with no padding: effects are
    compared position by position, so the prompts must be of one length."""
    if isinstance(tokens, Mapping):
        encoding = dict(tokens)
    else:
        ids = torch.as_tensor(tokens)
        encoding = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ids = encoding.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long,
                                                                               torch.int):
        raise ValueError(f"{name}: expected token ids [batch, seq] (int), got "
                         f"{getattr(ids, 'shape', type(ids).__name__)}")
    mask = encoding.setdefault("attention_mask", torch.ones_like(ids))
    if not bool(mask.all()):
        raise ValueError(f"{name}: padded prompts are not supported (effects are compared "
                         "position by position): give prompts of one token length")
    return encoding


@dataclasses.dataclass
class NodeEffects:
    """Per site: `features[name]` `[batch, seq, d_sae]` and `errors[name]` `[batch, seq]` (the
    error node's effect, summed over the model's dimension); `total` `[batch]` is
    metric(patch) - metric(clean), `clean` and `patched` the metric's values."""

    features: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor]
    total: torch.Tensor
    clean: torch.Tensor
    patched: torch.Tensor
    method: str

    def summed(self) -> NodeEffects:
        """Summed over positions: features `[batch, d_sae]`, errors `[batch]`."""
        return dataclasses.replace(
            self, features={n: v.sum(1) for n, v in self.features.items()},
            errors={n: v.sum(1) for n, v in self.errors.items()})

    def mean(self) -> NodeEffects:
        """Averaged over examples (the batch dimension dropped)."""
        return dataclasses.replace(
            self, features={n: v.mean(0) for n, v in self.features.items()},
            errors={n: v.mean(0) for n, v in self.errors.items()},
            total=self.total.mean(0), clean=self.clean.mean(0), patched=self.patched.mean(0))


def run_metric(model: Any, sites: list[Site], encoding: dict[str, torch.Tensor], metric: Metric,
               replace: Mapping[str, Callable] | None = None, errors: str = "keep"
               ) -> tuple[torch.Tensor, dict[str, SiteValues]]:
    """The metric `[batch]` of one run with the sites spliced in (and `replace`d where given), and
    the features and errors each site saw."""
    store: dict[str, SiteValues] = {}
    output = tracing.run(model, encoding,
                         patch=splice(sites, "record", store, replace, errors)).logits
    value = metric(output)
    batch = encoding["input_ids"].shape[0]
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch,):
        shape = getattr(value, "shape", None)
        raise ValueError(f"the metric must return one value per example, a tensor [{batch}], got "
                         f"{type(value).__name__}{'' if shape is None else list(shape)}")
    return value.detach(), store


@dataclasses.dataclass
class NodeState:
    """What node effects are made of, per site: the clean run's and the patch's values (`clean`,
    `patch`: SiteValues) and the metric's gradients at the features and the error (`gradients`:
    SiteValues holding gradients), beside the effects themselves."""

    sites: list[Site]
    clean_encoding: dict[str, torch.Tensor]
    clean: dict[str, SiteValues]
    patch: dict[str, SiteValues]
    gradients: dict[str, SiteValues]
    effects: NodeEffects
    errors: str = "keep"  # "zero": of the replacement model


def node_effects(model: Any, sites: Any, clean: Any, patch: Any = None,
                 metric: Metric | None = None, *, method: str = "attribution", steps: int = 10,
                 ig_rule: str = "midpoint", clean_answers: Any = None,
                 patch_answers: Any = None, errors: str = "keep") -> NodeEffects:
    """Every feature's and error's effect on `metric` (default: `logit_difference(clean_answers,
    patch_answers)`) from clean to patch. sites: `Site`s or `{name: (dictionary, point)}`, in any
    order. clean, patch: token ids `[batch, seq]` of one length (patch=None: zero ablation).
    errors: "keep" (the model itself) or "zero" (the replacement model)."""
    return node_state(model, sites, clean, patch, metric, method=method, steps=steps,
                      ig_rule=ig_rule, clean_answers=clean_answers,
                      patch_answers=patch_answers, errors=errors).effects


def node_state(model: Any, sites: Any, clean: Any, patch: Any = None,
               metric: Metric | None = None, *, method: str = "attribution", steps: int = 10,
               ig_rule: str = "midpoint", clean_answers: Any = None,
               patch_answers: Any = None, errors: str = "keep") -> NodeState:
    """`node_effects`, with the values and gradients they are made of (edges need them)."""
    sites = as_sites(sites)
    check_errors(errors)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if ig_rule not in IG_RULES:
        raise ValueError(f"ig_rule must be one of {tuple(IG_RULES)}, got {ig_rule!r}")
    if metric is None:
        if clean_answers is None or patch_answers is None:
            raise ValueError("give a metric, or clean_answers and patch_answers for the default "
                             "logit difference")
        metric = logit_difference(clean_answers, patch_answers)
    clean_encoding = as_encoding(clean, "clean")
    if patch is not None:
        patch_encoding = as_encoding(patch, "patch")
        if patch_encoding["input_ids"].shape != clean_encoding["input_ids"].shape:
            raise ValueError("clean and patch must have one shape [batch, seq], got "
                             f"{tuple(clean_encoding['input_ids'].shape)} and "
                             f"{tuple(patch_encoding['input_ids'].shape)}")
        patched, patch_values = run_metric(model, sites, patch_encoding, metric, errors=errors)
    else:
        patch_values = None
    clean_metric, clean_values = run_metric(model, sites, clean_encoding, metric, errors=errors)
    if patch_values is None:  # zero ablation
        patch_values = {name: SiteValues(torch.zeros_like(v.features), torch.zeros_like(v.error))
                        for name, v in clean_values.items()}
        patched, _ = run_metric(model, sites, clean_encoding, metric,
                                {s.name: _set(patch_values[s.name]) for s in sites}, errors)
    if method == "attribution":
        gradients = _attribution_gradients(model, sites, clean_encoding, metric, errors)
    else:
        gradients = {site.name: _ig_gradients(model, sites, site, clean_encoding, metric,
                                              clean_values[site.name], patch_values[site.name],
                                              steps, IG_RULES[ig_rule], errors)
                     for site in sites}
    features, error_nodes = {}, {}
    for site in sites:
        clean_value, patch_value = clean_values[site.name], patch_values[site.name]
        gradient = gradients[site.name]
        features[site.name] = (patch_value.features - clean_value.features) * gradient.features
        error_nodes[site.name] = ((patch_value.error - clean_value.error)
                                  * gradient.error).sum(-1)
    effects = NodeEffects(features, error_nodes, patched - clean_metric, clean_metric, patched,
                          method)
    return NodeState(sites, clean_encoding, clean_values, patch_values, gradients, effects,
                     errors)


def _set(values: SiteValues) -> Callable:
    return lambda features, error: (values.features, values.error)


def _attribution_gradients(model: Any, sites: list[Site], encoding: dict[str, torch.Tensor],
                           metric: Metric, errors: str) -> dict[str, SiteValues]:
    store: dict[str, SiteValues] = {}
    with torch.enable_grad():
        output = tracing.run(model, encoding, patch=splice(sites, "attribute", store,
                                                           errors=errors), grad=True).logits
        leaves = [tensor for site in sites
                  for tensor in (store[site.name].features, store[site.name].error)]
        grads = torch.autograd.grad(metric(output).sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    return {site.name: SiteValues(grads[2 * i], grads[2 * i + 1]) for i, site in enumerate(sites)}


def _ig_gradients(model: Any, sites: list[Site], site: Site, encoding: dict[str, torch.Tensor],
                  metric: Metric, clean: SiteValues, patch: SiteValues, steps: int,
                  offset: float, errors: str) -> SiteValues:
    """The metric's gradients at `site`'s features and error, averaged over `steps` points
    alpha = (i + offset) / steps on the path clean + alpha (patch - clean), in one run over the
    batch repeated `steps` times; the other sites are left as the model computes them (their
    reconstructions with errors "zero")."""
    batch = encoding["input_ids"].shape[0]
    tiled = {key: _tile(value, steps) for key, value in encoding.items()}
    alphas = ((torch.arange(steps, dtype=torch.float64) + offset) / steps).repeat_interleave(batch)

    def along_path(features: torch.Tensor, error: torch.Tensor):
        a = alphas.to(features.device, features.dtype)[:, None, None]
        return (_tile(clean.features, steps) + a * _tile(patch.features - clean.features, steps),
                _tile(clean.error, steps) + a * _tile(patch.error - clean.error, steps))

    store: dict[str, SiteValues] = {}
    with torch.enable_grad():
        others = [other for other in sites if other is not site] if errors == "zero" else []
        modes = {site.name: "attribute", **{other.name: "record" for other in others}}
        output = tracing.run(model, tiled, patch=splice([site, *others], modes, store,
                                                        {site.name: along_path}, errors),
                             grad=True).logits
        values = store[site.name]
        total = sum(metric(part).sum() for part in output.split(batch))  # each alpha's batch
        grads = torch.autograd.grad(total, [values.features, values.error],
                                    allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g
             for v, g in zip((values.features, values.error), grads)]
    return SiteValues(*(g.view(steps, batch, *g.shape[1:]).mean(0) for g in grads))


def _tile(tensor: torch.Tensor, steps: int) -> torch.Tensor:
    return tensor.repeat(steps, *([1] * (tensor.dim() - 1)))

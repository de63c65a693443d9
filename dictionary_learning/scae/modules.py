"""Training a suite's modules from scratch in one call: `train_suite` reads every layer's attention
output and MLP input / output from one model pass per batch of texts (an ActivationBuffer over a
dict of hook points, or an activation cache holding those entries) and trains all 2L TopK modules on
it with `train_dictionaries`."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..buffer import ActivationBuffer
from ..checks import integer, renamed_keywords, split_options
from ..models import d_model, hook, model_fingerprint, n_layers
from ..trainers import TopKTrainer
from ..training import RunOptions, train_dictionaries
from .suite import SCAESuite, module_names, parse_module_name


def suite_hook_points(model: Any, layers: int) -> dict[str, Any]:
    """The hook points of a suite over the first `layers` layers, by module name: `attn_L` reads
    attn_out, `mlp_L` the pair (mlp_in, mlp_out)."""
    points = {}
    for name in module_names(layers):
        kind, layer = parse_module_name(name)
        points[name] = (hook(model, layer, "attn_out") if kind == "attn"
                        else (hook(model, layer, "mlp_in"), hook(model, layer, "mlp_out")))
    return points


@dataclasses.dataclass
class SuiteTraining:
    """`train_suite`'s options for the suite's modules and the buffer it reads them with (its other
    options are the training run's, `training.RunOptions`)."""

    model_name: str | None = None
    lr: float | None = None
    warmup_steps: int | None = None  # None: a tenth of the steps
    dead_feature_threshold: int = 1_000_000
    n_ctxs: int = 256
    ctx_len: int = 128
    refresh_batch_size: int = 32
    out_batch_size: int = 2048
    remove_bos: bool = False
    seed: int = 0
    device: str | torch.device | None = None


@renamed_keywords(dict_size="d_sae")
def train_suite(model: Any, layers: int | None, d_sae: int, k: int, data: Any, steps: int,
                **options: Any) -> SCAESuite:
    """Train an SCAE suite's modules (a TopK attention SAE and a TopK transcoder on each of the
    first `layers` layers; None: every layer; `d_sae` features each) for `steps` steps on one
    activation stream, and return them as an `SCAESuite`.

    data: texts (each batch of `refresh_batch_size` texts runs through the model once, the trace
      stopped after the last layer's MLP, and feeds every module), or an activation cache / iterator
      of dict batches whose entries are named as the suite's modules (`attn_0`, `mlp_0`, ...).
    options: `SuiteTraining` fields, and `training.RunOptions` fields for the run (e.g. `save_dir`,
      `resume`, `checkpoint_steps`, `use_wandb`, `autocast_dtype`, `progress`: the training bar and
      the buffer's fill bars).
    The modules are trained on normalised activations (`normalize_activations`, default "d_model")
    with the scale folded back in, so the suite works on raw activations. `save_dir`: the run's
    folders (`trainer_{i}`, in module order, and the checkpoint for `resume=True`) and the suite in
    `save_dir/suite`.
    """
    own, run_options = split_options(options, [[f.name for f in dataclasses.fields(SuiteTraining)],
                                               [f.name for f in dataclasses.fields(RunOptions)]],
                                     "train_suite")
    cfg = SuiteTraining(**own)
    run = RunOptions(**{"normalize_activations": "d_model", **run_options})
    layers = n_layers(model) if layers is None else integer("layers", layers, 1, n_layers(model),
                                                            high_name="the model's layers")
    integer("d_sae", d_sae)
    integer("k", k, 1, d_sae, high_name="d_sae")
    names = module_names(layers)
    if getattr(data, "entry_names", None) is None and not isinstance(data, ActivationBuffer):
        data = ActivationBuffer(data, model, suite_hook_points(model, layers), n_ctxs=cfg.n_ctxs,
                                ctx_len=cfg.ctx_len, refresh_batch_size=cfg.refresh_batch_size,
                                out_batch_size=cfg.out_batch_size, remove_bos=cfg.remove_bos,
                                seed=cfg.seed, device=cfg.device or "cpu", progress=run.progress)
    missing = sorted(set(names) - set(data.entry_names or []))
    if missing:
        raise ValueError(f"the data holds no activations for the suite's modules {missing}; it "
                         f"holds {data.entry_names}")
    width = d_model(model)
    warmup_steps = max(1, steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps
    configs = [dict(trainer=TopKTrainer, activation_dim=width, dict_size=d_sae, k=k, lr=cfg.lr,
                    steps=steps, warmup_steps=warmup_steps, seed=cfg.seed + i,
                    device=str(cfg.device) if cfg.device is not None else "cpu",
                    transcoder=name.startswith("mlp"),
                    dead_feature_threshold=cfg.dead_feature_threshold,
                    layer=parse_module_name(name)[1], lm_name=cfg.model_name, submodule_name=name,
                    wandb_name=f"SCAE/{name}")
               for i, name in enumerate(names)]
    trainers = train_dictionaries(data, configs, steps, run)
    modules = {}
    for name, trainer in zip(names, trainers):
        module = copy.deepcopy(trainer.ae)
        with torch.no_grad():
            module.fold_scale(*trainer.normalization_scales)  # works on raw activations
        modules[name] = module
    suite = SCAESuite(modules, model_name=cfg.model_name,
                      model_fingerprint=model_fingerprint(model))
    if run.save_dir is not None:
        suite.save(Path(run.save_dir) / "suite")
    return suite

"""Evaluation: reconstruction metrics on activation batches, `patched_losses` through nnsight
patching, feature density, top-activating contexts and activation statistics.

- `metrics.py`: reconstruction_metrics (one batch), feature_density, plot_feature_density,
  activation_statistics, check_finite: what a dictionary does to activations it is given, with no
  model run.
- `loss.py`: patched_losses (CE and KL clean, patched with the reconstruction, ablated: patched
  runs through `tracing.run`), upstream's loss_recovered over it, encode_inputs and hook_points_for
  (upstream's submodule / io to hook points).
- `summary.py`: evaluate, both averaged over a buffer's batches and texts, under upstream's, this
  toolkit's and SAEBench's names.
- `contexts.py`: top_activating_contexts.
"""

from .contexts import top_activating_contexts
from .loss import (
    IO_MODES,
    TRACER_ARGS,
    encode_inputs,
    hook_points_for,
    loss_recovered,
    patched_losses,
)
from .metrics import (
    activation_statistics,
    check_finite,
    feature_density,
    plot_feature_density,
    reconstruction_metrics,
)
from .summary import evaluate

__all__ = [
    "IO_MODES", "TRACER_ARGS", "activation_statistics", "check_finite", "encode_inputs", "evaluate",
    "feature_density", "hook_points_for", "loss_recovered", "patched_losses",
    "plot_feature_density", "reconstruction_metrics", "top_activating_contexts",
]

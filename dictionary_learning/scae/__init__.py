"""Sparsely connected autoencoders (SCAE): a suite of attention-output SAEs and MLP transcoders, one
of each per layer, in which every feature is computed from a few source features (features of
earlier modules).

The wing's rooms, in the order they build on each other (each imports only rooms above it in this
list):
- `suite.py`: `SCAESuite` holds the modules (and, once selected, their connections; save / load as
  one folder); `Connections`; module names and `sources_of`.
- `kernels.py`: the hand-written autograd functions (`GatherDot` for virtual weights, `connect` /
  `CSRProduct` for the pruned pass).
- `tracing.py`: the wing's model runs: `run_suite` patches every module's reconstruction into the
  model in one trace and records what the linearisation needs; `clean_targets` and `patched_logits`
  (through `tracing.run`).
- `pruned.py`: `decompose` splits each module's encoder pre-activation exactly into
  per-source-module terms plus an embedding term and a bias term; `virtual_weights`;
  `pruned_forward` recomputes every module, in layer order, from its connected source features'
  pruned codes only.
- `selection.py`: `select_connections` keeps, per feature, the C source features with the
  largest |mean contribution| (`contribution_statistics` + `connections_from_statistics`, one module
  pair in memory at a time); `random_connections` draws C at random, the control.
- `evaluation.py`: `evaluate_suite` / `ce_versus_c` measure CE (clean, dense suite, pruned suite)
  and per-module FVU and L0; tables and plots.
- `modules.py`: `train_suite` trains every module of a new suite from one model pass per batch of
  texts (a buffer over all their hook points, or an activation cache), with `trainSAE`.
- `training.py`: `SCAETrainer` / `train_scae_suite` fine-tune through the pruned pass (the reference
  fork's size-scaled lr, linear decay, staggered module losses, dead features with AuxK) on local
  MSE and downstream CE and / or KL, on the package's training loop.

Linearisation. With the norm scales s(t) (1 / rms, after centring for LayerNorm) and the attention
patterns P_h[q, k] held fixed, a downstream encoder row e_F receives from source feature j
(decoder column d_j, activation a_j):
- into a transcoder at layer L:      a_j(t) * s(t) * e_F . (w_norm * C d_j)
- into an attention SAE at layer L:  sum_h sum_k P_h[q, k] * s(k) * a_j(k) * e_F . ((w_norm * C d_j)
                                     W_V^h W_O^h)
where C centres (LayerNorm) or is the identity (RMSNorm); grouped-query heads are expanded to one OV
map per query head. Source features are those of every earlier module
(`sources_of(name, model)`), except that in a parallel-residual block (GPT-NeoX / Pythia: the MLP's
norm reads the block input) a layer's MLP does not read the same layer's attention. The embedding
(with learned positions, for GPT-2) and the biases (the sources' b_dec, the norm's bias, b_V, b_O,
the encoder's own bias and b_dec) make up the rest, always kept in full, so that with every source
feature kept the decomposition equals the dense pre-activation exactly.

Which run's s(t) and P_h: the run with the dense suite's reconstructions patched in, not the clean
model's (the reference fork uses the clean run's). The suite replaces every attention and MLP
output, so the residual stream it computes on, and hence the norm scales and patterns, are those of
the patched run; holding the clean run's fixed would make even C = all differ from the dense suite
by the error the reconstructions introduce into s and P. With the patched run's, C = all reproduces
the dense suite exactly (tested), and pruning changes only what it removes. Both are a linearisation
around one run: the pruned pass does not recompute s or P from the pruned codes.
"""

from .evaluation import (
    ce_table,
    ce_versus_c,
    evaluate_suite,
    module_table,
    plot_ce_versus_c,
    plot_connection_statistics,
    suite_cross_entropy,
)
from .modules import SuiteTraining, suite_hook_points, train_suite
from .pruned import decompose, pruned_forward, pruned_pre_activations, virtual_weights
from .selection import (
    ContributionStatistics,
    all_connections,
    connections_from_statistics,
    contribution_statistics,
    pair_contributions,
    random_connections,
    select_connections,
)
from .suite import (
    Connections,
    SCAESuite,
    load_connections,
    module_names,
    parse_module_name,
    renamed_error,
    save_connections,
    sources_of,
)
from .tracing import SuiteRecord, clean_targets, patched_logits, run_suite
from .training import SCAEConfig, SCAETrainer, train_scae_suite

# the public names; the kernels stay in scae.kernels
__all__ = [
    "Connections", "ContributionStatistics", "SCAEConfig", "SCAESuite", "SCAETrainer",
    "SuiteRecord", "SuiteTraining",
    "all_connections", "ce_table", "ce_versus_c", "clean_targets", "connections_from_statistics",
    "contribution_statistics", "decompose", "evaluate_suite", "load_connections", "module_names",
    "module_table", "pair_contributions", "parse_module_name", "patched_logits", "plot_ce_versus_c",
    "plot_connection_statistics", "pruned_forward", "pruned_pre_activations", "random_connections",
    "run_suite",
    "save_connections", "select_connections",
    "suite_cross_entropy", "suite_hook_points",
    "sources_of", "train_scae_suite", "train_suite", "virtual_weights",
]


def __getattr__(name: str):
    """A name the wing renamed (`upstream_of`) fails with its new name."""
    raise renamed_error(__name__, name)

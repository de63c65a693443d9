"""Upstream dictionary_learning's calling conventions, as thin adapters over this package's core
API.

- `trainer_api.py`: upstream's trainer API on every `trainers.base.Trainer` (a mixin): the flat
  constructor in upstream's positional order built from the method's config dataclass,
  `loss(x, step, logging) -> LossLog`, hyperparameters as attributes, `num_tokens_since_fired`
- `signatures.py`: `flat_signature`, upstream's flat constructor signature built from a config
  dataclass (the trainers' and, through `buffer/settings.py`, the buffers')
- `generators.py`: upstream's text generators (re-exported by `utils.py`)

The facades at upstream's own import paths use these or are thin adapters themselves:
`trainers/trainer.py` (`SAETrainer`, the schedule and decoder-norm helpers, `ConstrainedAdam`),
`training/upstream.py` (`trainSAE`'s two call forms, `get_norm_factor`, `log_stats`,
`new_wandb_process`), `buffer/settings.py` (the buffers' flat constructors), `utils.py` and
`evaluation/loss.py` (upstream's `loss_recovered` over `patched_losses`). Imports nothing of the
package but the floor-0 helpers, so every room may use it.
"""

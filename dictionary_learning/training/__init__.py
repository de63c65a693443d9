"""Training: `trainSAE` (both of upstream's call forms) on the one training loop of the package.

- `train.py`: `train_dictionaries` (many trainers on one stream; `RunOptions` says how it runs),
  `build_trainer` (upstream-style config dicts)
- `loop.py`: `run_steps` (the loop `trainSAE` and `scae.train_scae_suite` run on) with its rooms:
  `Checkpoints` (atomic, resumable: `resume_from_checkpoints`), `Saves` (upstream's intermediate
  saves)
- `logger.py`: `Logger` (progress bar, wandb, printed logs), `start_wandb` (offline unless
  $WANDB_MODE says)
- `feed.py`: a batch as each trainer sees it: `Routing` (dict batches by submodule_name), `Scales`
  (activation normalisation, `activation_scales`), `Feed`
- `distributed.py`: torch.distributed training (`init_distributed`, `shard`, `DataParallel`), used
  by `distributed="data"` / `"trainers"`
- `end_to_end.py`: `EndToEnd`, training a trainer's dictionary on the model's downstream KL / CE
  (`trainSAE(..., end_to_end={...})`)
- `upstream.py`: upstream's entry points over these: `trainSAE` (upstream's signature, and the
  founding README's form through `train_autoencoder`), `get_norm_factor`, `log_stats`,
  `new_wandb_process`
"""

from .distributed import DataParallel, exit_distributed, init_distributed, shard
from .end_to_end import EndToEnd
from .feed import Feed, Routing, Scales, activation_scales
from .logger import Logger, start_wandb
from .loop import (
                   CHECKPOINT,
                   Checkpoints,
                   Every,
                   Saves,
                   load_checkpoint,
                   resume_from_checkpoints,
                   run_steps,
                   save_checkpoint,
)
from .train import RunOptions, build_trainer, train_dictionaries
from .upstream import get_norm_factor, log_stats, new_wandb_process, train_autoencoder, trainSAE

__all__ = [
    "CHECKPOINT", "Checkpoints", "DataParallel", "EndToEnd", "Every", "Feed", "Logger", "Routing",
    "RunOptions", "Saves", "Scales", "activation_scales", "build_trainer", "exit_distributed",
    "get_norm_factor", "init_distributed", "load_checkpoint", "log_stats", "new_wandb_process",
    "resume_from_checkpoints", "run_steps",
    "save_checkpoint", "shard", "start_wandb", "trainSAE", "train_autoencoder",
    "train_dictionaries",
]

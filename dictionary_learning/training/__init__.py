"""Training: `trainSAE` (both of upstream's call forms) on the one training loop of the package.

- `loop.py`: `run_steps` (the loop `trainSAE` and `scae.train_scae_suite` run on), checkpoints and exact resume
  (`resume_from_checkpoints`), offline-capable wandb runs (`start_wandb`)
- `train.py`: `build_trainer` (upstream-style config dicts), `train_dictionaries` (many trainers on one stream),
  `trainSAE` (dispatching the two call forms)
- `distributed.py`: torch.distributed training (`init_distributed`, `shard`, `DataParallel`), used by `trainSAE`'s
  `distributed="data"` / `"trainers"`
- `end_to_end.py`: `EndToEnd`, training a trainer's dictionary on the model's downstream KL / CE (`trainSAE(...,
  end_to_end={...})`)
- `upstream.py`: upstream's `get_norm_factor`, `log_stats`, `new_wandb_process`, and `train_autoencoder` (the
  founding README's call form)
"""

from .distributed import DataParallel, exit_distributed, init_distributed, shard
from .end_to_end import EndToEnd
from .loop import CHECKPOINT, Every, resume_from_checkpoints, run_steps, start_wandb
from .train import build_trainer, train_dictionaries, trainSAE
from .upstream import activation_scales, get_norm_factor, log_stats, new_wandb_process, train_autoencoder

__all__ = [
    "CHECKPOINT", "DataParallel", "EndToEnd", "Every", "activation_scales", "build_trainer", "exit_distributed", "get_norm_factor",
    "init_distributed", "log_stats", "new_wandb_process", "resume_from_checkpoints", "run_steps", "shard",
    "start_wandb", "trainSAE", "train_autoencoder", "train_dictionaries",
]

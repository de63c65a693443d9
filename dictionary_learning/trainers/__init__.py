"""Training methods, one file each (upstream's module names): a config dataclass and a
`base.Trainer` subclass each, composed of the shared mechanics in `parts`; upstream's trainer API is
`compat.trainer_api` and `trainer`."""

from .base import StepOutput, Trainer, TrainerConfig
from .batch_top_k import BatchTopKConfig, BatchTopKSAE, BatchTopKTrainer
from .gated_anneal import GatedAnnealConfig, GatedAnnealTrainer
from .gdm import GatedConfig, GatedSAETrainer
from .jumprelu import JumpReluConfig, JumpReluTrainer
from .matryoshka_batch_top_k import (
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKTrainer,
    MatryoshkaConfig,
)
from .p_anneal import PAnnealConfig, PAnnealTrainer
from .standard import AprilConfig, StandardConfig, StandardTrainer, StandardTrainerAprilUpdate
from .top_k import AutoEncoderTopK, TopKConfig, TopKTrainer
from .trainer import SAETrainer

TRAINER_CLASSES = {
    cls.__name__: cls
    for cls in (StandardTrainer, StandardTrainerAprilUpdate, TopKTrainer, BatchTopKTrainer,
                GatedSAETrainer, GatedAnnealTrainer, PAnnealTrainer, JumpReluTrainer,
                MatryoshkaBatchTopKTrainer)
}
TRAINER_CLASSES["TopKTrainerAux"] = TopKTrainer  # an older upstream name, so its configs load

__all__ = [
    "AprilConfig", "AutoEncoderTopK", "BatchTopKConfig", "BatchTopKSAE", "BatchTopKTrainer",
    "GatedAnnealConfig", "GatedAnnealTrainer", "GatedConfig", "GatedSAETrainer", "JumpReluConfig",
    "JumpReluTrainer", "MatryoshkaBatchTopKSAE", "MatryoshkaBatchTopKTrainer", "MatryoshkaConfig",
    "PAnnealConfig", "PAnnealTrainer", "SAETrainer", "StandardConfig", "StandardTrainer",
    "StandardTrainerAprilUpdate", "StepOutput", "TRAINER_CLASSES", "TopKConfig", "TopKTrainer",
    "Trainer", "TrainerConfig",
]

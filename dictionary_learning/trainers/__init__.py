"""Training methods, one file each (upstream's module names), on the SAETrainer base."""

from .batch_top_k import BatchTopKSAE, BatchTopKTrainer
from .gated_anneal import GatedAnnealTrainer
from .gdm import GatedSAETrainer
from .jumprelu import JumpReluTrainer
from .matryoshka_batch_top_k import MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKTrainer
from .p_anneal import PAnnealTrainer
from .standard import StandardTrainer, StandardTrainerAprilUpdate
from .top_k import AutoEncoderTopK, TopKTrainer
from .trainer import SAETrainer

TRAINER_CLASSES = {
    cls.__name__: cls
    for cls in (StandardTrainer, StandardTrainerAprilUpdate, TopKTrainer, BatchTopKTrainer, GatedSAETrainer,
                GatedAnnealTrainer, PAnnealTrainer, JumpReluTrainer, MatryoshkaBatchTopKTrainer)
}
TRAINER_CLASSES["TopKTrainerAux"] = TopKTrainer  # an older upstream name, so its configs load

__all__ = [
    "AutoEncoderTopK", "BatchTopKSAE", "BatchTopKTrainer", "GatedAnnealTrainer", "GatedSAETrainer", "JumpReluTrainer",
    "MatryoshkaBatchTopKSAE", "MatryoshkaBatchTopKTrainer", "PAnnealTrainer", "SAETrainer", "StandardTrainer",
    "StandardTrainerAprilUpdate", "TRAINER_CLASSES", "TopKTrainer",
]

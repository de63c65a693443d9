"""Training methods, one file each, on the SAETrainer base."""

from .standard import StandardTrainer
from .top_k import BatchTopKTrainer, TopKTrainer
from .trainer import SAETrainer

TRAINER_CLASSES = {cls.__name__: cls for cls in (StandardTrainer, TopKTrainer, BatchTopKTrainer)}
# upstream names, so their configs load
TRAINER_CLASSES.update(StandardTrainerAprilUpdate=StandardTrainer, TopKTrainerAux=TopKTrainer)

__all__ = ["SAETrainer", "StandardTrainer", "TopKTrainer", "BatchTopKTrainer", "TRAINER_CLASSES"]

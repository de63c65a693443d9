"""dictionary_learning: sparse autoencoders, transcoders and sparsely connected autoencoders on
nnsight.

The names a researcher reaches for first; everything else lives in the rooms named in
ARCHITECTURE.md (the SCAE wing: `dictionary_learning.scae`).
"""

import os

# before torch allocates anything: PyTorch's own switch for 2 MB pages on large CPU tensors, so a
# training step's fresh [d_sae, d_in] gradients and temporaries are not faulted in 4 KB at a time
# (a fill of one at 16k x 2,048 costs about a third); a value the user set wins, and a process that
# imported torch first keeps its setting (docs/benchmarks.md)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .buffer import ActivationBuffer
from .cache import ActivationCache, write_cache
from .data import default_corpus, hf_dataset_texts, local_texts, text_source
from .dictionary import (
                         AutoEncoder,
                         AutoEncoderNew,
                         AutoEncoderTopK,
                         BatchTopKSAE,
                         Dictionary,
                         GatedAutoEncoder,
                         IdentityDict,
                         JumpReluAutoEncoder,
                         MatryoshkaBatchTopKSAE,
)
from .evaluation import evaluate, loss_recovered, patched_losses
from .models import HookPoint, get_adapter, hook, load_model
from .trainers import (
                         BatchTopKTrainer,
                         GatedAnnealTrainer,
                         GatedSAETrainer,
                         JumpReluTrainer,
                         MatryoshkaBatchTopKTrainer,
                         PAnnealTrainer,
                         SAETrainer,
                         StandardTrainer,
                         StandardTrainerAprilUpdate,
                         TopKTrainer,
)
from .training import trainSAE
from .utils import load_dictionary, pull_from_hub, push_to_hub, save_dictionary

__all__ = [
    "ActivationBuffer",
    "ActivationCache",
    "AutoEncoder",
    "AutoEncoderNew",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "BatchTopKTrainer",
    "Dictionary",
    "GatedAnnealTrainer",
    "GatedAutoEncoder",
    "GatedSAETrainer",
    "HookPoint",
    "IdentityDict",
    "JumpReluAutoEncoder",
    "JumpReluTrainer",
    "MatryoshkaBatchTopKSAE",
    "MatryoshkaBatchTopKTrainer",
    "PAnnealTrainer",
    "SAETrainer",
    "StandardTrainer",
    "StandardTrainerAprilUpdate",
    "TopKTrainer",
    "default_corpus",
    "evaluate",
    "get_adapter",
    "hf_dataset_texts",
    "hook",
    "load_dictionary",
    "load_model",
    "local_texts",
    "loss_recovered",
    "patched_losses",
    "pull_from_hub",
    "push_to_hub",
    "save_dictionary",
    "text_source",
    "trainSAE",
    "write_cache",
]

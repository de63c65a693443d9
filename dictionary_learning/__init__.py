"""dictionary_learning: sparse autoencoders, transcoders and sparsely connected autoencoders on nnsight."""

from .buffer import ActivationBuffer
from .data import default_corpus, hf_dataset_texts, local_texts, text_source
from .models import HookPoint, get_adapter, hook, load_model

__all__ = [
    "ActivationBuffer",
    "HookPoint",
    "default_corpus",
    "get_adapter",
    "hf_dataset_texts",
    "hook",
    "load_model",
    "local_texts",
    "text_source",
]

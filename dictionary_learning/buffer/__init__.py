"""Activation buffers: shuffled streams of activations read out of a language model through nnsight.

- `ActivationBuffer` (activation.py): texts in; one hook point (io "out" / "in") or an input /
  output pair ("in_to_out"); upstream's constructor (0.1.0, GitHub HEAD and the founding README's
  `in_feats` / `out_feats`).
- `HeadActivationBuffer` (heads.py): per-head activations of one attention layer.
- `NNsightActivationBuffer` (tokens.py): token-id data in, every position kept; io "in_and_out"
  stacks pairs.
- `ShuffledStore` (store.py): the rows a buffer holds, refilled at half, permuted, taken in order;
  `epochs`: endless shuffled batches over activations already collected.

The same buffer over a plain Hugging Face model with PyTorch hooks (no nnsight) is
`dictionary_learning.pytorch_buffer`.
"""

from .activation import IO_MODES, ActivationBuffer
from .heads import HeadActivationBuffer, output_projection_path
from .store import Epochs, ShuffledStore, epochs
from .tokens import TOKEN_IO_MODES, NNsightActivationBuffer

__all__ = [
    "IO_MODES", "TOKEN_IO_MODES", "ActivationBuffer", "Epochs", "HeadActivationBuffer",
    "NNsightActivationBuffer", "ShuffledStore", "epochs", "output_projection_path",
]

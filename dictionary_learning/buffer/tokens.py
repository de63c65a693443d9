"""NNsightActivationBuffer: upstream's buffer over pre-tokenized data.

`data` yields token-id sequences (lists or 1-D tensors) that go through the model as they are: no
tokenizer, no truncation, every position kept. Sequences of one length are stacked as upstream does;
ragged ones are left padded and the padding dropped (upstream cannot stack them). io="in_and_out"
serves a module's input and output stacked, `[out_batch_size, 2, d]`, a transcoder's pairs for a
module whose input and output have the same width.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..models import UPSTREAM_IO
from .activation import ActivationBuffer
from .settings import UPSTREAM_SIZES, BufferSettings, takes_settings

TOKEN_IO_MODES = ("out", "in", "in_and_out")


class NNsightActivationBuffer(ActivationBuffer):
    """Iterator over batches of activations from token-id data: `[out_batch_size, d]`,
    or `[out_batch_size, 2, d]` for io="in_and_out". Upstream's arguments in upstream's order; dtype
    and seed by keyword."""

    # "in_and_out" reads as "in_to_out" on one module, then stacks
    io_modes = (*TOKEN_IO_MODES, "in_to_out")

    @takes_settings(UPSTREAM_SIZES, ("dtype", "seed", "progress"))
    def __init__(self, data: Iterable[Sequence[int] | torch.Tensor], model: Any, submodule: Any,
                 d_submodule: int | None = None, io: str = "out", *, settings: BufferSettings):
        if io not in TOKEN_IO_MODES:
            raise ValueError(f"io must be one of {TOKEN_IO_MODES}, got {io!r}")
        if io == "in_and_out" and isinstance(submodule, dict):
            raise ValueError("io='in_and_out' stacks one module's input and output; for a dict of "
                             "hook points use io='out' / 'in' and (input, output) pairs, which "
                             "yield (x, y) pairs")
        super().__init__(data, model, submodule, d_submodule,
                         UPSTREAM_IO[io], **settings.arguments())
        self.io = io
        if io == "in_and_out":
            d_in, d_out = self.d_submodule
            if d_in != d_out:
                raise ValueError("io='in_and_out' stacks input and output, which needs one width; "
                                 f"{self.hooks[0]} has width {d_in} and {self.hooks[1]} width "
                                 f"{d_out}")
            self.d_submodule = d_in

    def _serve(self, sides: list[torch.Tensor]) -> Any:
        return torch.stack(sides, dim=1) if self.io == "in_and_out" else super()._serve(sides)

    def _check_item(self, item: Any) -> None:
        if isinstance(item, (str, bytes)) or not isinstance(item, (Sequence, torch.Tensor)):
            raise TypeError("data must yield token-id sequences (lists or 1-D tensors), got "
                            f"{type(item).__name__}")

    def _usable(self, item: Sequence[int] | torch.Tensor) -> torch.Tensor | None:
        """A sequence as 1-D token ids, or None to skip it (empty)."""
        ids = torch.as_tensor(item, dtype=torch.long).flatten()
        return ids if ids.numel() else None

    def _probe_encoding(self) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(1, 4, dtype=torch.long),
                "attention_mask": torch.ones(1, 4, dtype=torch.long)}

    def _next_encoding(self) -> dict[str, torch.Tensor] | None:
        try:
            return self.tokenized_batch()
        except StopIteration:
            return None

    def tokenized_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """The next sequences as model inputs: `input_ids` `[batch, seq]` (left padded with the
        tokenizer's pad id, or 0, where lengths differ) and `attention_mask` (0 on padding)."""
        rows = self._next_items(batch_size)
        length = max(len(ids) for ids in rows)
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, length - len(ids):] = ids
            attention_mask[i, length - len(ids):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def token_batch(self, batch_size: int | None = None) -> torch.Tensor:
        """The next `batch_size` sequences as one `[batch, seq]` tensor of token ids (raises
        StopIteration when none are left)."""
        return self.tokenized_batch(batch_size)["input_ids"]

    def text_batch(self, batch_size: int | None = None) -> torch.Tensor:
        """Upstream's name for `token_batch` in this buffer (its data are token ids)."""
        return self.token_batch(batch_size)

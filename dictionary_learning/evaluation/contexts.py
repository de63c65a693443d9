"""`top_activating_contexts`: the held-out texts where chosen features fire most, as text around the
token."""

from __future__ import annotations

from typing import Any

import torch

from ..dictionary import Dictionary
from ..models import HookPoint
from ..progress import progress_bar
from ..tracing import read_hook_points, token_mask, tokenize


@torch.no_grad()
def top_activating_contexts(
    dictionary: Dictionary,
    model: Any,
    point: HookPoint,
    texts: list[str],
    features: list[int],
    n_top: int = 5,
    ctx_len: int = 128,
    batch_size: int = 16,
    window: int = 16,
    remove_bos: bool = True,
    progress: bool = True,
    tokens: int | None = None,
) -> dict[int, list[tuple[float, str]]]:
    """For each feature, its `n_top` strongest activations on `texts` with the preceding `window`
    tokens as text; the activating token is marked «like this». `point` is what the dictionary reads
    (a transcoder's input side). progress: a bar over the text batches on stderr when they take a
    few seconds. tokens: stop after the batch in which this many tokens were read (None: read every
    text)."""
    features_tensor = torch.tensor(features, dtype=torch.long)  # long even when empty
    best_values = torch.full((len(features), n_top), -torch.inf)
    best_where: list[list[tuple[int, int, int] | None]] = [[None] * n_top for _ in features]
    encodings, read = [], 0
    desc = f"top contexts of {len(features)} features on {len(texts)} texts"
    starts = range(0, len(texts), batch_size)
    for start in progress_bar(starts, desc=desc, enabled=progress, unit="batch"):
        encoding = tokenize(model.tokenizer, texts[start : start + batch_size], ctx_len)
        encodings.append(encoding)
        [x] = read_hook_points(model, encoding, [point])
        mask = token_mask(encoding, remove_bos)
        parameter = next(dictionary.parameters())
        codes = dictionary.encode(x.reshape(-1, x.shape[-1]).to(device=parameter.device,
                                                                dtype=parameter.dtype))
        # the running best are kept on the CPU
        codes = codes[:, features_tensor.to(codes.device)].float().cpu()
        codes = codes.reshape(*mask.shape, len(features)).masked_fill(~mask[..., None], -torch.inf)
        for j in range(len(features)):
            values, flat = codes[..., j].flatten().topk(min(n_top, codes[..., j].numel()))
            merged = torch.cat([best_values[j], values])
            where = best_where[j] + [(len(encodings) - 1, int(i) // mask.shape[1],
                                      int(i) % mask.shape[1])
                                     for i in flat]
            order = merged.topk(n_top).indices
            best_values[j] = merged[order]
            best_where[j] = [where[i] for i in order]
        read += int(mask.sum())
        if tokens is not None and read >= tokens:
            break
    results: dict[int, list[tuple[float, str]]] = {}
    for j, feature in enumerate(features):
        rows = []
        for value, place in zip(best_values[j].tolist(), best_where[j]):
            if place is None or value <= 0:
                continue
            batch_index, row, position = place
            ids = encodings[batch_index]["input_ids"][row]
            # skip left padding
            first_real = int(encodings[batch_index]["attention_mask"][row].int().argmax())
            before = model.tokenizer.decode(ids[max(first_real, position - window) : position])
            token = model.tokenizer.decode(ids[position : position + 1])
            after = model.tokenizer.decode(ids[position + 1 : position + 4])
            rows.append((value, f"{before}«{token}»{after}".replace("\n", "\\n")))
        results[feature] = rows
    return results


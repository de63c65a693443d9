"""What a feature's weights say, without running the model: the tokens its decoder direction
promotes and suppresses through the unembedding, and its strongest source connections (an SCAE
suite's selected connections, or a transcoder's virtual weights from an earlier dictionary's
decoder)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import renamed_keywords
from ..dictionary import Dictionary
from ..models import get_adapter, get_module, norm_params


def __getattr__(name: str) -> Any:
    if name == "Upstream":
        raise AttributeError(f"{__name__}.Upstream was renamed Sources (a feature's sources are "
                             "the earlier features it reads)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@torch.no_grad()
def decoder_directions(dictionary: Dictionary, features: list[int] | torch.Tensor,
                       chunk: int = 1024) -> torch.Tensor:
    """The output-space direction each feature writes, `[len(features), d_out]`: decode(e_i) -
    decode(0), which every dictionary class computes the same way (a skip transcoder's skip term
    cancels, read at x = 0)."""
    parameter = next(dictionary.parameters())
    features = torch.as_tensor(features, dtype=torch.long)
    zero_input = torch.zeros(1, dictionary.d_in, device=parameter.device,
                             dtype=parameter.dtype)
    base = dictionary.decode(torch.zeros(1, dictionary.d_sae, device=parameter.device,
                                         dtype=parameter.dtype), x=zero_input)
    rows = []
    for part in features.split(chunk):
        one_hot = torch.zeros(len(part), dictionary.d_sae, device=parameter.device,
                              dtype=parameter.dtype)
        one_hot[torch.arange(len(part)), part.to(parameter.device)] = 1.0
        rows.append((dictionary.decode(one_hot, x=zero_input.expand(len(part), -1))
                     - base).float().cpu())
    return torch.cat(rows) if rows else torch.empty(0, dictionary.d_out)


def encoder_rows(dictionary: Dictionary) -> torch.Tensor:
    """The encoder's weight as rows per feature, `[d_sae, d_in]` (pre-activation = W
    x + b)."""
    affine = getattr(dictionary, "_encoder_affine", None)
    if affine is not None:
        return affine()[0]
    encoder = getattr(dictionary, "encoder", None)
    if isinstance(encoder, nn.Linear):
        return encoder.weight
    raise TypeError(f"{type(dictionary).__name__} has no linear encoder to read virtual weights "
                    "from")


@torch.no_grad()
def logit_lens(model: Any, directions: torch.Tensor, n_tokens: int = 10, chunk: int = 256
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top ids, top values, bottom ids, bottom values), each `[n, n_tokens]`: the logits W_U (w *
    C d) of each decoder direction d through the final norm's linear part (its weight w, with C
    centring for LayerNorm, Gemma's 1 + w: `norm_params(model, None, "final")`) and the unembedding.
    Left out: the norm's per-token scale 1 / rms (positive and shared by every vocabulary entry, so
    it changes no ranking) and its bias (the same logits W_U b whatever the feature). So this is the
    logit lens of the direction read through the final norm as the model reads the residual stream,
    not a plain W_U d."""
    unembed = get_module(model, get_adapter(model).unembed).weight  # [vocab, d_model]
    if directions.shape[1] != unembed.shape[1]:
        raise ValueError(f"decoder directions of width {directions.shape[1]} cannot be read "
                         f"through the unembedding of width {unembed.shape[1]}")
    final = norm_params(model, None, "final")
    results: list[list[torch.Tensor]] = [[], [], [], []]
    for part in directions.split(chunk):
        part = part.to(device=unembed.device, dtype=torch.float32)
        logits = final.linear_part(part).float() @ unembed.float().t()  # [n, vocab]
        top = logits.topk(min(n_tokens, logits.shape[1]), dim=1)
        bottom = logits.topk(min(n_tokens, logits.shape[1]), dim=1, largest=False)
        for slot, tensor in enumerate((top.indices, top.values, bottom.indices, bottom.values)):
            results[slot].append(tensor.cpu())
    return tuple(torch.cat(r) for r in results)  # type: ignore[return-value]


@dataclass
class Sources:
    """Per shown feature, its strongest source connections: lists of (module or dictionary name,
    feature, weight) strongest first, and a sentence saying what the weights are."""

    connections: list[list[tuple[str, int, float]]]
    description: str


@torch.no_grad()
@renamed_keywords(upstream="source")
def virtual_weight_connections(dictionary: Dictionary, source: Dictionary, features: list[int],
                               name: str, model: Any = None, layer: int | None = None,
                               n_connections: int = 10, chunk: int = 1024) -> Sources:
    """For a transcoder and an earlier dictionary writing into the stream it reads: the virtual
    weights e_F . d_j (this encoder row, the source's decoder direction) with the largest |value|
    per feature. When the transcoder reads an MLP input (`layer` given), the decoder directions pass
    through that MLP's pre-norm linear part first (`norm_params(model, layer, "mlp")`: the SCAE
    linearisation, without the per-token 1 / rms)."""
    if source.d_out != dictionary.d_in:
        raise ValueError(f"the source dictionary writes width {source.d_out}, but this "
                         f"one reads width {dictionary.d_in}")
    rows = encoder_rows(dictionary)
    encoder = rows[torch.as_tensor(features, device=rows.device)].float()  # [n, d_in]
    best_values = torch.empty(len(features), 0)
    best_indices = torch.empty(len(features), 0, dtype=torch.long)
    for start in range(0, source.d_sae, chunk):
        indices = torch.arange(start, min(start + chunk, source.d_sae))
        directions = decoder_directions(source, indices).to(encoder.device)
        if layer is not None:
            directions = norm_params(model, layer, "mlp").linear_part(directions).float()
        weights = (encoder @ directions.t()).cpu()  # [n, chunk]
        merged_values = torch.cat([best_values, weights], dim=1)
        merged_indices = torch.cat([best_indices, indices.expand(len(features), -1)], dim=1)
        keep = merged_values.abs().topk(min(n_connections, merged_values.shape[1]), dim=1).indices
        best_values, best_indices = merged_values.gather(1, keep), merged_indices.gather(1, keep)
    connections = [[(name, int(j), float(w)) for j, w in zip(row_i.tolist(), row_w.tolist())]
                   for row_i, row_w in zip(best_indices, best_values)]
    through = " through the MLP's pre-norm weight" if layer is not None else ""
    return Sources(connections,
                   f"virtual weights W_enc · W_dec(source)ᵀ{through}, largest |value| first")


@renamed_keywords(upstream_names="source_names")
def suite_connections(suite: Any, model: Any, name: str, features: list[int],
                      n_connections: int = 10,
                      source_names: list[str] | None = None) -> Sources | None:
    """An SCAE suite module's selected connections (None when the suite was saved without
    connections): per feature the first `n_connections` (strongest first where selection scored
    them, else by |weight|), each with its source module (of `source_names`, in the order the
    connections index them: `scae.sources_of`), feature and virtual weight (an attention SAE's
    per-head weights summed over heads)."""
    connections = suite.connections
    if connections is None:
        return None
    names = source_names if source_names is not None else []
    sizes = torch.tensor([suite[source].d_sae for source in names])
    starts = torch.cumsum(sizes, 0) - sizes
    indices = connections.indices[name][features].cpu()  # [n, C]
    weights = connections.weights[name][features].float().cpu()
    if weights.dim() == 3:
        weights = weights.sum(dim=2)
    scored = connections.scores is not None and name in connections.scores
    if not scored:
        order = weights.abs().argsort(dim=1, descending=True)
        indices, weights = indices.gather(1, order), weights.gather(1, order)
    rows = []
    for row_i, row_w in zip(indices[:, :n_connections].tolist(),
                            weights[:, :n_connections].tolist()):
        row = []
        for index, weight in zip(row_i, row_w):
            module = int(torch.searchsorted(starts, torch.tensor(index), right=True)) - 1
            row.append((names[module], int(index - starts[module]), float(weight)))
        rows.append(row)
    order = "strongest |mean contribution| first" if scored else "largest |weight| first"
    heads = "; attention weights summed over heads" if name.startswith("attn") else ""
    return Sources(rows, f"the suite's selected connections: virtual weights, {order}{heads}")

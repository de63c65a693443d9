"""The linearised suite (the maths is in the wing's docstring, `scae/__init__.py`): `decompose`
splits a module's encoder pre-activation exactly into per-source-module terms, an embedding term
and a bias term; `virtual_weights` gives each kept connection's weight; `pruned_pre_activations` /
`pruned_forward` recompute every module, in layer order, from its connected source features'
pruned codes only."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..checks import renamed_keywords
from ..dictionary import topk_codes
from ..models import attention_ov, norm_params
from .kernels import GatherDot, connect
from .suite import Connections, SCAESuite, parse_module_name, sources_of
from .tracing import SuiteRecord


@renamed_keywords(upstream_codes="source_codes")
def decompose(suite: SCAESuite, model: Any, record: SuiteRecord, name: str,
              source_codes: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Module `name`'s encoder pre-activations `[batch, seq, d_sae]` split into one term per
    source module (summed over that module's features), "embedding" and "bias"; the terms add up
    to the dense pre-activation of the recorded run. `source_codes` replaces the recorded codes
    (an empty dict: embedding and bias only)."""
    kind, layer = parse_module_name(name)
    target = suite[name]
    # [d_sae, d], [d_sae]
    encoder_weight, encoder_bias = target.encoder.weight, target.encoder.bias
    norm = norm_params(model, layer, kind)
    scale = record.norm_scales[name][..., None]  # [batch, seq, 1]

    # residual-stream pieces entering this module's norm, each [batch, seq, d_model]
    codes = record.codes if source_codes is None else source_codes
    pieces = {source: codes[source] @ suite[source].decoder.weight.t()
              for source in sources_of(name, model) if source in codes}
    pieces["embedding"] = record.embedding
    constant = torch.zeros_like(norm.weight)  # the sources' decoder biases, [d_model]
    for source in sources_of(name, model):
        constant = constant + suite[source].b_dec
    normed = {key: scale * norm.linear_part(value) for key, value in pieces.items()}
    normed_constant = scale * norm.linear_part(constant.expand_as(record.embedding))
    norm_bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)

    if kind == "mlp":  # transcoder: e_F . mlp_in + b_enc
        terms = {key: value @ encoder_weight.t() for key, value in normed.items()}
        terms["bias"] = (normed_constant + norm_bias) @ encoder_weight.t() + encoder_bias
        return terms

    # attention SAE: e_F . (attn_out - b_dec) + b_enc, attn_out = sum_h P_h (x W_V^h + b_V^h)
    # W_O^h + b_O
    ov = attention_ov(model, layer)
    pattern = record.patterns[layer]  # [batch, heads, q, k]

    # [batch, seq, d_model] -> [batch, seq, d_sae]
    def through_heads(x: torch.Tensor) -> torch.Tensor:
        values = torch.einsum("bkd,hde->bhke", x, ov.W_V)
        mixed = torch.einsum("bhqk,bhke->bhqe", pattern, values)
        return torch.einsum("bhqe,hed->bqd", mixed, ov.W_O) @ encoder_weight.t()

    terms = {key: through_heads(value) for key, value in normed.items()}
    bias = through_heads(normed_constant + norm_bias)
    if ov.b_V is not None:  # each pattern row sums to 1 over real keys
        row_sums = pattern.sum(dim=-1)  # [batch, heads, q]
        bias = bias + torch.einsum("bhq,he,hed->bqd", row_sums, ov.b_V, ov.W_O) @ encoder_weight.t()
    output_bias = (ov.b_O if ov.b_O is not None else 0) - target.b_dec
    terms["bias"] = bias + output_bias @ encoder_weight.t() + encoder_bias
    return terms


def source_decoder(suite: SCAESuite, name: str, rows: torch.Tensor,
                   model: Any = None) -> torch.Tensor:
    """Decoder columns of the source features (`sources_of(name, model)`) at the sorted indices
    `rows` into their concatenation, as rows in that order: `[len(rows), d_model]`. Only those
    columns are copied."""
    parts, offset = [], 0
    for source in sources_of(name, model):
        weight, size = suite[source].decoder.weight, suite[source].d_sae  # [d_model, size]
        local = rows[(rows >= offset) & (rows < offset + size)] - offset
        parts.append(weight.index_select(1, local).t())
        offset += size
    return (torch.cat(parts) if parts
            else suite[name].encoder.weight.new_zeros(0, suite[name].d_in))


def virtual_weights(suite: SCAESuite, model: Any, name: str, indices: torch.Tensor) -> torch.Tensor:
    """e_F . (w_norm * C d_j) for transcoders, e_F . ((w_norm * C d_j) W_V^h W_O^h) per head for
    attention SAEs, for every feature F and its connected source features j = indices[F]:
    `[d_sae, C]` / `[d_sae, C, heads]`. Only the connected source decoder columns are
    read; cost scales with d_sae x C (never d_sae x n_sources)."""
    kind, layer = parse_module_name(name)
    encoder = suite[name].encoder.weight  # [d_sae, d_model]
    n_features, C = indices.shape
    ov = attention_ov(model, layer) if kind == "attn" else None
    if C == 0:
        return encoder.new_zeros(n_features, 0, *([ov.n_heads] if ov is not None else []))
    # position: [d_sae, C] rows of `normed`
    used, position = indices.unique(return_inverse=True)
    # [used, d_model]
    normed = norm_params(model, layer, kind).linear_part(source_decoder(suite, name, used, model))
    if ov is None:
        return GatherDot.apply(encoder[:, None], normed, position)[..., 0]
    d_model, d_head = ov.W_V.shape[1:]
    reads = torch.einsum("fm,hem->fhe", encoder, ov.W_O)  # [d_sae, heads, d_head]: e_F W_O^h^T
    # two contraction orders give the same numbers: meet in the d_head-wide middle (values of the
    # used source features, then C x d_head products) or fold W_V into the reads (then C x d_model
    # products); take the cheaper
    meet_in_middle = len(used) * d_model * d_head + n_features * C * d_head
    if meet_in_middle <= n_features * d_model * d_head + n_features * C * d_model:
        writes = torch.einsum("jd,hde->jhe", normed, ov.W_V)  # [used, heads, d_head]
        return GatherDot.apply(reads, writes, position)
    # [d_sae, heads, d_model]: e_F (W_V^h W_O^h)^T
    folded = torch.einsum("fhe,hde->fhd", reads, ov.W_V)
    return GatherDot.apply(folded, normed, position)


@renamed_keywords(upstream_codes="source_codes")
def pruned_pre_activations(suite: SCAESuite, model: Any, record: SuiteRecord,
                           connections: Connections, name: str,
                           source_codes: dict[str, torch.Tensor],
                           recompute_weights: bool = False) -> torch.Tensor:
    """Module `name`'s pre-activations `[batch, seq, d_sae]` from its connected source
    features only (with the given source codes), plus the embedding and bias terms, under the
    recorded run's norm scales and attention patterns. The connected source codes are summed with
    their virtual weights as one sparse product (`kernels.connect`), so the cost scales with
    d_sae x C per token and the memory with the connected source features active in the batch,
    never with d_sae x n_sources; attention SAEs sum per head at each key position, then mix
    the sums across positions with the pattern. Differentiable in the suite's parameters;
    `recompute_weights` derives the virtual weights from the current parameters (as training needs)
    instead of using the stored ones."""
    kind, layer = parse_module_name(name)
    dense_terms = decompose(suite, model, record, name, source_codes={})
    pre = dense_terms["embedding"] + dense_terms["bias"]
    if not sources_of(name, model) or connections.indices[name].shape[1] == 0:
        return pre
    batch, seq = pre.shape[:2]
    sources = [source_codes[source].reshape(batch * seq, -1)
               for source in sources_of(name, model)]
    indices = connections.indices[name]
    # checkpointed: rebuilt in the backward pass rather than kept (the gathered decoder
    if recompute_weights:
        # blocks of 60 modules at full SmolLM2 depth would not fit in memory)
        weights = checkpoint(virtual_weights, suite, model, name, indices, use_reentrant=False)
    else:
        weights = connections.weights[name]
    # [tokens, d_sae] or [tokens, d_sae, heads]
    summed = connect(sources, indices, weights)
    # every source feature at token t enters through the norm with the same scale s(t) (at the
    # key, for attention)
    summed = summed * record.norm_scales[name].reshape(-1, *[1] * (summed.dim() - 1))
    if kind == "mlp":
        return pre + summed.view(batch, seq, -1)
    # head h at query q reads key k with weight P_h[q, k]
    per_head = summed.view(batch, seq, -1, summed.shape[-1])  # [batch, key, d_sae, heads]
    return pre + torch.einsum("bhqk,bkfh->bqf", record.patterns[layer], per_head)


def pruned_forward(suite: SCAESuite, model: Any, record: SuiteRecord, connections: Connections,
                   recompute_weights: bool = False,
                   pre_activations: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Every module's TopK codes `[batch, seq, d_sae]`, computed in layer order from the pruned
    codes of its connected source features (never the clean ones), plus the embedding and bias
    terms. A dict passed as `pre_activations` receives each module's pruned pre-activations
    (for AuxK)."""
    connections.validate(suite, model, weights=not recompute_weights)
    codes: dict[str, torch.Tensor] = {}
    for name in suite.names:
        pre = pruned_pre_activations(suite, model, record, connections, name, codes,
                                     recompute_weights)
        if pre_activations is not None:
            pre_activations[name] = pre
        codes[name] = topk_codes(pre.relu(), int(suite[name].k))[0]
    return codes

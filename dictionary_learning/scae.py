"""Sparsely connected autoencoders (SCAE): a suite of attention-output SAEs and MLP transcoders, one of each per
layer, in which every feature is computed from a few upstream features.

The pipeline: `SCAESuite` holds the modules (and, once selected, their connections; save / load as one folder);
`run_suite` patches every module's reconstruction into the model in one nnsight trace and records what the
linearisation needs; `decompose` splits each module's encoder pre-activation exactly into per-upstream-module
terms plus an embedding term and a bias term; `select_connections` keeps, per feature, the C upstream features
with the largest |mean contribution| (`contribution_statistics` + `connections_from_statistics`, one module pair
in memory at a time); `pruned_forward` recomputes every module, in layer order, from its connected upstream
features' pruned codes only; `evaluate_suite` / `ce_versus_c` measure CE (clean, dense suite, pruned suite) and
per-module FVU and L0; `SCAETrainer` / `train_scae_suite` fine-tune through the pruned pass on local MSE and
downstream CE.

Linearisation. With the norm scales s(t) (1 / rms, after centring for LayerNorm) and the attention patterns
P_h[q, k] held fixed, a downstream encoder row e_F receives from upstream feature j (decoder column d_j,
activation a_j):
- into a transcoder at layer L:      a_j(t) * s(t) * e_F . (w_norm * C d_j)
- into an attention SAE at layer L:  sum_h sum_k P_h[q, k] * s(k) * a_j(k) * e_F . ((w_norm * C d_j) W_V^h W_O^h)
where C centres (LayerNorm) or is the identity (RMSNorm); grouped-query heads are expanded to one OV map per query
head. The embedding (with learned positions, for GPT-2) and the biases (upstream b_dec, the norm's bias, b_V, b_O,
the encoder's own bias and b_dec) make up the rest, always kept in full, so that with every upstream feature kept
the decomposition equals the dense pre-activation exactly.

Which run's s(t) and P_h: the run with the dense suite's reconstructions patched in, not the clean model's (the
reference fork uses the clean run's). The suite replaces every attention and MLP output, so the residual stream it
computes on, and hence the norm scales and patterns, are those of the patched run; holding the clean run's fixed
would make even C = all differ from the dense suite by the error the reconstructions introduce into s and P.
With the patched run's, C = all reproduces the dense suite exactly (tested), and pruning changes only what it
removes. Both are a linearisation around one run: the pruned pass does not recompute s or P from the pruned codes.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .buffer import model_inputs, tokenize
from .dictionary import Dictionary, TopKDictionary
from .models import attention_ov, get_adapter, n_layers, norm_params, read_value
from .utils import atomic_write, atomic_write_json, load_dictionary, pyplot, save_dictionary, save_figure


def module_names(n_layer: int) -> list[str]:
    """The suite's modules in execution order: attn_0, mlp_0, attn_1, mlp_1, ..."""
    return [f"{kind}_{layer}" for layer in range(n_layer) for kind in ("attn", "mlp")]


def upstream_of(name: str) -> list[str]:
    """Modules whose outputs reach `name`'s input: everything earlier in execution order."""
    kind, layer = name.split("_")
    order = module_names(int(layer) + 1)
    return order[: order.index(name)]


class SCAESuite(nn.Module):
    """Per-layer TopK attention SAEs (attn_out -> attn_out) and TopK transcoders (mlp_in -> mlp_out)."""

    def __init__(self, modules: dict[str, Dictionary], model_name: str | None = None,
                 connections: "Connections | None" = None):
        super().__init__()
        if not modules:
            raise ValueError("an SCAESuite needs at least one module")
        layers = 1 + max(int(name.split("_")[1]) for name in modules)
        expected = module_names(layers)
        if sorted(modules) != sorted(expected):
            raise ValueError(f"an SCAESuite needs an attention SAE and a transcoder on every layer: expected "
                             f"{expected}, got {sorted(modules)}")
        for name, module in modules.items():
            if not isinstance(module, TopKDictionary):
                raise TypeError(f"{name}: SCAE modules are TopK dictionaries, got {type(module).__name__}")
            if module.skip is not None:
                raise ValueError(f"{name}: transcoders with a skip connection are not supported in an SCAE")
            if name.startswith("attn") and module.transcoder:
                raise ValueError(f"{name}: attention modules are SAEs (not transcoders)")
        self.names = expected
        self.dictionaries = nn.ModuleDict({name: modules[name] for name in expected})
        self.model_name = model_name
        self.n_layers = layers
        self.connections = connections  # the suite's selected connections, saved and loaded with it
        if connections is not None:
            connections.validate(self)

    def __getitem__(self, name: str) -> Dictionary:
        return self.dictionaries[name]

    def check_model(self, model: Any) -> None:
        """Clear errors for a suite whose widths or depth do not match the model."""
        config = model._module.config
        d_model = int(getattr(config, "hidden_size", None) or config.n_embd)
        if self.n_layers > n_layers(model):
            raise ValueError(f"the suite has {self.n_layers} layers, the model {n_layers(model)}")
        for name, module in self.dictionaries.items():
            if module.activation_dim != d_model or module.output_dim != d_model:
                raise ValueError(f"{name} maps {module.activation_dim} -> {module.output_dim}, but the model's "
                                 f"width is {d_model}")

    @classmethod
    def random(cls, model: Any, dict_size: int, k: int, n_layer: int | None = None, seed: int = 0) -> "SCAESuite":
        """An untrained suite for `model` (all layers, or the first `n_layer`)."""
        from .dictionary import AutoEncoderTopK

        config = model._module.config
        d_model = int(getattr(config, "hidden_size", None) or config.n_embd)
        torch.manual_seed(seed)
        modules = {name: AutoEncoderTopK(d_model, dict_size, k, transcoder=name.startswith("mlp"))
                   for name in module_names(n_layer or n_layers(model))}
        return cls(modules)

    def save(self, directory: str | Path) -> Path:
        """One folder: a dictionary folder per module (upstream's ae.pt + config.json format), the connections
        (connections.safetensors, if set) and suite.json, written last so a folder with it is complete."""
        directory = Path(directory)
        for name, module in self.dictionaries.items():
            save_dictionary(module, directory / name)
        if self.connections is not None:
            save_connections(self.connections, directory / "connections.safetensors")
        atomic_write_json(directory / "suite.json", {"modules": self.names, "model_name": self.model_name,
                                                     "connections": self.connections is not None})
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "SCAESuite":
        directory = Path(directory)
        if not (directory / "suite.json").exists():
            raise ValueError(f"{str(directory)!r} is not a saved SCAESuite (no suite.json)")
        meta = json.loads((directory / "suite.json").read_text())
        modules = {name: load_dictionary(directory / name, device=device)[0] for name in meta["modules"]}
        connections = load_connections(directory / "connections.safetensors") if meta.get("connections") else None
        return cls(modules, model_name=meta.get("model_name"), connections=connections)


@dataclass
class SuiteRecord:
    """What one run of the model with the suite patched in recorded, for tokens `[batch, seq]`."""

    mask: torch.Tensor  # [batch, seq] real tokens
    embedding: torch.Tensor  # [batch, seq, d_model]: the residual stream before layer 0
    codes: dict[str, torch.Tensor]  # module -> [batch, seq, dict_size] TopK codes
    encoder_inputs: dict[str, torch.Tensor]  # module -> [batch, seq, d_model] what its encoder read
    norm_scales: dict[str, torch.Tensor]  # "attn_L" / "mlp_L" -> [batch, seq] s(t) of the norm before it
    patterns: dict[int, torch.Tensor]  # layer -> [batch, heads, seq, seq]


def _norm_scale(norm, x: torch.Tensor) -> torch.Tensor:
    """s(t) = 1 / sqrt(mean(C x)^2 + eps) of a pre-norm: `[..., d] -> [...]`."""
    if norm.kind == "layer":
        x = x - x.mean(dim=-1, keepdim=True)
    return torch.rsqrt(x.pow(2).mean(dim=-1) + norm.eps)


@torch.no_grad()
def run_suite(suite: SCAESuite, model: Any, texts: list[str], ctx_len: int = 128, logits: bool = True
              ) -> tuple[SuiteRecord, torch.Tensor | None]:
    """Run the model with every module's reconstruction patched in (attention outputs replaced by the attention
    SAEs' reconstructions, MLP outputs by the transcoders'), recording codes, norm scales and attention patterns.
    Returns the record and the logits (None with `logits=False`, which stops the pass after the suite's last
    layer). The model must run eager attention (`load_model(..., attn_implementation="eager")`) so that
    attention modules return their patterns."""
    suite.check_model(model)
    adapter = get_adapter(model)
    encoding = tokenize(model.tokenizer, texts, ctx_len)
    saved: dict[str, Any] = {}
    with model.trace(model_inputs(encoding)) as tracer:
        for layer in range(suite.n_layers):
            block = adapter.block(layer)
            attn_norm_in = model.get(f"{block}.{adapter.attn_norm}").input
            if layer == 0:
                saved["embedding"] = read_value(attn_norm_in).save()
            saved[f"resid_pre_{layer}"] = read_value(attn_norm_in).save()
            attn = model.get(f"{block}.{adapter.attn}")
            attn_output = attn.output
            if attn_output[1] is None:
                raise ValueError("the model's attention returns no patterns: load it with attn_implementation='eager'")
            sae = suite[f"attn_{layer}"]
            attn_out = attn_output[0]
            codes = sae.encode(attn_out)
            saved[f"codes_attn_{layer}"] = codes.save()
            saved[f"input_attn_{layer}"] = attn_out.save()
            saved[f"pattern_{layer}"] = attn_output[1].save()
            attn.output = (sae.decode(codes), *attn_output[1:])
            saved[f"resid_mid_{layer}"] = read_value(model.get(f"{block}.{adapter.mlp_norm}").input).save()
            mlp = model.get(f"{block}.{adapter.mlp}")
            mlp_in = read_value(mlp.input)
            transcoder = suite[f"mlp_{layer}"]
            codes = transcoder.encode(mlp_in)
            saved[f"codes_mlp_{layer}"] = codes.save()
            saved[f"input_mlp_{layer}"] = mlp_in.save()
            mlp.output = transcoder.decode(codes)
        if logits:
            saved["logits"] = model.output.logits.save()
        else:
            tracer.stop()
    norm_scales = {}
    for layer in range(suite.n_layers):
        norm_scales[f"attn_{layer}"] = _norm_scale(norm_params(model, layer, "attn"), saved[f"resid_pre_{layer}"])
        norm_scales[f"mlp_{layer}"] = _norm_scale(norm_params(model, layer, "mlp"), saved[f"resid_mid_{layer}"])
    record = SuiteRecord(
        mask=encoding["attention_mask"].bool(),
        embedding=saved["embedding"],
        codes={name: saved[f"codes_{name}"] for name in suite.names},
        encoder_inputs={name: saved[f"input_{name}"] for name in suite.names},
        norm_scales=norm_scales,
        patterns={layer: saved[f"pattern_{layer}"] for layer in range(suite.n_layers)},
    )
    return record, saved.get("logits")


def _through_norm(norm, vectors: torch.Tensor) -> torch.Tensor:
    """w_norm * C v for rows v (the linear part of the norm, before the per-token scale)."""
    if norm.kind == "layer":
        vectors = vectors - vectors.mean(dim=-1, keepdim=True)
    return vectors * norm.weight


def decompose(suite: SCAESuite, model: Any, record: SuiteRecord, name: str,
              upstream_codes: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Module `name`'s encoder pre-activations `[batch, seq, dict_size]` split into one term per upstream module
    (summed over that module's features), "embedding" and "bias"; the terms add up to the dense pre-activation
    of the recorded run. `upstream_codes` replaces the recorded codes (an empty dict: embedding and bias only)."""
    kind, layer = name.split("_")[0], int(name.split("_")[1])
    target = suite[name]
    encoder_weight, encoder_bias = target.encoder.weight, target.encoder.bias  # [dict_size, d], [dict_size]
    norm = norm_params(model, layer, kind)
    scale = record.norm_scales[name][..., None]  # [batch, seq, 1]

    # residual-stream pieces entering this module's norm, each [batch, seq, d_model]
    codes = record.codes if upstream_codes is None else upstream_codes
    pieces = {up: codes[up] @ suite[up].decoder.weight.t() for up in upstream_of(name) if up in codes}
    pieces["embedding"] = record.embedding
    constant = torch.zeros_like(norm.weight)  # upstream decoder biases, [d_model]
    for up in upstream_of(name):
        constant = constant + suite[up].b_dec
    normed = {key: scale * _through_norm(norm, value) for key, value in pieces.items()}
    normed_constant = scale * _through_norm(norm, constant.expand_as(record.embedding))
    norm_bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)

    if kind == "mlp":  # transcoder: e_F . mlp_in + b_enc
        terms = {key: value @ encoder_weight.t() for key, value in normed.items()}
        terms["bias"] = (normed_constant + norm_bias) @ encoder_weight.t() + encoder_bias
        return terms

    # attention SAE: e_F . (attn_out - b_dec) + b_enc, attn_out = sum_h P_h (x W_V^h + b_V^h) W_O^h + b_O
    ov = attention_ov(model, layer)
    pattern = record.patterns[layer]  # [batch, heads, q, k]

    def through_heads(x: torch.Tensor) -> torch.Tensor:  # [batch, seq, d_model] -> [batch, seq, dict_size]
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


# --------------------------------------------------------------------------------------------------------------
# connections and the pruned forward pass


@dataclass
class Connections:
    """For each module, the upstream features each of its features reads: `indices[name]` `[dict_size, C]` into the
    concatenation of `upstream_of(name)`'s features (in that order), and their virtual weights `weights[name]`:
    `[dict_size, C]` for transcoders, `[dict_size, C, n_heads]` for attention SAEs (one per head). Selected
    connections come strongest first in each row (so `top(C)` keeps the C strongest), with `scores[name]` `[dict_size,
    C]` their |mean contribution| and `totals[name]` `[dict_size]` each feature's total |mean contribution| over all
    of its upstream features."""

    indices: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor] | None = None
    totals: dict[str, torch.Tensor] | None = None

    def validate(self, suite: "SCAESuite") -> None:
        """Clear errors for connections that do not fit the suite."""
        for name in suite.names:
            if name not in self.indices:
                raise ValueError(f"no connections for module {name}")
            indices, n_up = self.indices[name], sum(suite[up].dict_size for up in upstream_of(name))
            if indices.dim() != 2 or indices.shape[0] != suite[name].dict_size:
                raise ValueError(f"{name}: expected indices of shape [{suite[name].dict_size}, C], got "
                                 f"{tuple(indices.shape)}")
            if indices.numel() and (indices.min() < 0 or indices.max() >= n_up):
                raise ValueError(f"{name}: connection indices must lie in [0, {n_up}), got "
                                 f"[{int(indices.min())}, {int(indices.max())}]")
            if indices.shape[1] > 1 and (indices.sort(dim=1).values.diff(dim=1) == 0).any():
                raise ValueError(f"{name}: a feature lists the same upstream feature twice")
            if self.weights[name].shape[:2] != indices.shape:
                raise ValueError(f"{name}: weights of shape {tuple(self.weights[name].shape)} do not match indices "
                                 f"{tuple(indices.shape)}")

    def top(self, C: int) -> "Connections":
        """The first C connections of every feature: the C strongest, for selected connections."""
        _check_C(C)

        def first(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if tensors is None else {name: t[:, :C] for name, t in tensors.items()}

        return Connections(first(self.indices), first(self.weights), first(self.scores), self.totals)


def _check_C(C: Any) -> None:
    if isinstance(C, bool) or not isinstance(C, int) or C <= 0:
        raise ValueError(f"C must be a positive int, got {C!r}")


def _upstream_decoder(suite: SCAESuite, name: str, rows: torch.Tensor) -> torch.Tensor:
    """Decoder columns of the upstream features at the sorted indices `rows` into their concatenation, as rows in
    upstream order: `[len(rows), d_model]`. Only those columns are copied."""
    parts, offset = [], 0
    for up in upstream_of(name):
        weight, size = suite[up].decoder.weight, suite[up].dict_size  # [d_model, size]
        local = rows[(rows >= offset) & (rows < offset + size)] - offset
        parts.append(weight.index_select(1, local).t())
        offset += size
    return torch.cat(parts) if parts else suite[name].encoder.weight.new_zeros(0, suite[name].activation_dim)


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] through index_select on the flattened index (several times faster than advanced indexing)."""
    return table.index_select(0, index.flatten()).view(*index.shape, *table.shape[1:])


class _GatherDot(torch.autograd.Function):
    """out[f, c, h] = A[f, h] . B[index[f, c]] (B `[J, d]`, shared by the heads) or A[f, h] . B[index[f, c], h]
    (B `[J, heads, d]`), for A `[F, heads, d]`, in blocks of rows so the gathered `[rows, C, ...]` blocks stay small.
    A custom backward writes each block's gradient into one preallocated tensor: autograd through sliced blocks
    would zero-fill a full-size gradient per block (measured: a third of a fine-tuning step)."""

    CHUNK = 256

    @staticmethod
    def forward(ctx, A, B, index):
        ctx.save_for_backward(A, B, index)
        pattern = "fhd,fcd->fch" if B.dim() == 2 else "fhd,fchd->fch"
        out = A.new_empty(index.shape[0], index.shape[1], A.shape[1])
        for start in range(0, len(index), _GatherDot.CHUNK):
            rows = slice(start, start + _GatherDot.CHUNK)
            out[rows] = torch.einsum(pattern, A[rows], _gather_rows(B, index[rows]))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        A, B, index = ctx.saved_tensors
        grad_A = torch.empty_like(A) if ctx.needs_input_grad[0] else None
        grad_B = torch.zeros_like(B) if ctx.needs_input_grad[1] else None
        shared = B.dim() == 2
        for start in range(0, len(index), _GatherDot.CHUNK):
            rows = slice(start, start + _GatherDot.CHUNK)
            if grad_A is not None:
                grad_A[rows] = torch.einsum("fch,fcd->fhd" if shared else "fch,fchd->fhd", grad_out[rows],
                                            _gather_rows(B, index[rows]))
            if grad_B is not None:
                block = torch.einsum("fch,fhd->fcd" if shared else "fch,fhd->fchd", grad_out[rows], A[rows])
                grad_B.index_add_(0, index[rows].flatten(), block.flatten(0, 1))
        return grad_A, grad_B, None


def virtual_weights(suite: SCAESuite, model: Any, name: str, indices: torch.Tensor) -> torch.Tensor:
    """e_F . (w_norm * C d_j) for transcoders, e_F . ((w_norm * C d_j) W_V^h W_O^h) per head for attention SAEs,
    for every feature F and its connected upstream features j = indices[F]: `[dict_size, C]` / `[dict_size, C,
    heads]`. Only the connected upstream decoder columns are read; cost scales with dict_size x C (never
    dict_size x n_upstream)."""
    kind, layer = name.split("_")[0], int(name.split("_")[1])
    encoder = suite[name].encoder.weight  # [dict_size, d_model]
    n_features, C = indices.shape
    n_heads = attention_ov(model, layer).W_V.shape[0] if kind == "attn" else 0
    if C == 0:
        return encoder.new_zeros(n_features, 0, *([n_heads] if kind == "attn" else []))
    used, position = indices.unique(return_inverse=True)  # position: [dict_size, C] rows of `normed`
    normed = _through_norm(norm_params(model, layer, kind), _upstream_decoder(suite, name, used))  # [used, d_model]
    if kind == "mlp":
        return _GatherDot.apply(encoder[:, None], normed, position)[..., 0]
    ov = attention_ov(model, layer)
    d_model, d_head = ov.W_V.shape[1:]
    reads = torch.einsum("fm,hem->fhe", encoder, ov.W_O)  # [dict_size, heads, d_head]: e_F W_O^h^T
    # two contraction orders give the same numbers: meet in the d_head-wide middle (values of the used upstream
    # features, then C x d_head products) or fold W_V into the reads (then C x d_model products); take the cheaper
    meet_in_middle = len(used) * d_model * d_head + n_features * C * d_head
    if meet_in_middle <= n_features * d_model * d_head + n_features * C * d_model:
        writes = torch.einsum("jd,hde->jhe", normed, ov.W_V)  # [used, heads, d_head]
        return _GatherDot.apply(reads, writes, position)
    folded = torch.einsum("fhe,hde->fhd", reads, ov.W_V)  # [dict_size, heads, d_model]: e_F (W_V^h W_O^h)^T
    return _GatherDot.apply(folded, normed, position)


@torch.no_grad()
def all_connections(suite: SCAESuite, model: Any) -> Connections:
    """Every feature connected to every upstream feature (C = all): the pruned pass then equals the dense one.
    Only for small suites: this is the dense dict_size x n_upstream matrix the pruned pass otherwise avoids."""
    indices, weights = {}, {}
    for name in suite.names:
        n_up = sum(suite[up].dict_size for up in upstream_of(name))
        indices[name] = torch.arange(n_up).expand(suite[name].dict_size, n_up).contiguous()
        weights[name] = virtual_weights(suite, model, name, indices[name])
    return Connections(indices, weights)


def _topk_codes(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = pre.relu().topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


def _connect(upstream: list[torch.Tensor], indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t, F] = sum_c weights[F, c] * x[t, indices[F, c]], where x is the concatenation of the `upstream` code
    tensors `[tokens, n_module]` along features (never built). `weights` `[dict_size, C]` or `[dict_size, C, heads]`
    gives out `[tokens, dict_size]` or `[tokens, dict_size, heads]`. Computed as a sparse [dict_size, columns]
    connection matrix (dict_size x C non-zeros) times the dense codes of the upstream features that are both
    connected and active somewhere in the batch: work tokens x dict_size x C, memory tokens x those columns; no
    dict_size x n_upstream matrix. Differentiable in the upstream codes and the weights."""
    n_features, C = indices.shape
    connected = torch.zeros(sum(x.shape[1] for x in upstream), dtype=torch.bool)
    connected[indices.flatten()] = True
    columns, lookup_parts, n_columns, offset = [], [], 0, 0
    for x in upstream:
        used = ((x.detach() != 0).any(dim=0) & connected[offset : offset + x.shape[1]]).nonzero().flatten()
        lookup = torch.full((x.shape[1],), -1, dtype=torch.long)
        lookup[used] = torch.arange(n_columns, n_columns + len(used))
        columns.append(x.index_select(1, used))
        lookup_parts.append(lookup)
        n_columns += len(used)
        offset += x.shape[1]
    lookup = torch.cat(lookup_parts)[indices]  # [dict_size, C]: column of each connection, -1 where inactive
    kept = lookup >= 0  # connections to upstream features inactive in the batch contribute nothing: left out
    if n_columns == 0:
        return weights.new_zeros(upstream[0].shape[0], n_features, *weights.shape[2:])
    codes = torch.cat(columns, dim=1).t().contiguous()  # [columns, tokens] (contiguous: ~4x faster products)
    row_starts = torch.cat([kept.new_zeros(1, dtype=torch.long), kept.sum(dim=1).cumsum(0)])
    values = weights[kept]  # [non-zeros] or [non-zeros, heads], row by row
    out = _CSRProduct.apply(values.reshape(len(values), -1), codes, row_starts, lookup[kept], n_features)
    return out[..., 0] if weights.dim() == 2 else out


class _CSRProduct(torch.autograd.Function):
    """out[t, F, h] = sum over the row F of a CSR matrix of values[i, h] * codes[column[i], t], one CSR product per
    head. Autograd's own backward for the CSR values took ~4.5x the forward's time here (dense matrix products in
    its profile); here the values' gradient is gathered per non-zero (work non-zeros x tokens) and the codes'
    gradient is a product with the transposed CSR matrix."""

    @staticmethod
    def forward(ctx, values, codes, row_starts, columns, n_rows):  # [nnz, heads], [n_columns, tokens]
        ctx.save_for_backward(values, codes, row_starts, columns)
        ctx.n_rows = n_rows
        with warnings.catch_warnings():  # "sparse CSR support is in beta": its products are ~1.7x faster than COO
            warnings.simplefilter("ignore", UserWarning)
            heads = [torch.sparse_csr_tensor(row_starts, columns, values[:, h], (n_rows, codes.shape[0]),
                                             check_invariants=False) @ codes for h in range(values.shape[1])]
        return torch.stack(heads, dim=-1).transpose(0, 1)  # [tokens, rows, heads]

    @staticmethod
    def backward(ctx, grad_out):
        values, codes, row_starts, columns = ctx.saved_tensors
        grad_rows = grad_out.permute(1, 2, 0).contiguous()  # [rows, heads, tokens]
        rows = torch.repeat_interleave(torch.arange(ctx.n_rows), row_starts.diff())  # row of each non-zero
        grad_values = grad_codes = None
        if ctx.needs_input_grad[0]:
            chunk = max(1, (1 << 24) // max(1, grad_rows.shape[1] * grad_rows.shape[2]))
            grad_values = torch.cat([torch.einsum("nht,nt->nh", _gather_rows(grad_rows, rows[i : i + chunk]),
                                                  _gather_rows(codes, columns[i : i + chunk]))
                                     for i in range(0, len(rows), chunk)]) if len(rows) else torch.zeros_like(values)
        if ctx.needs_input_grad[1]:  # the transposed matrix, as a CSR over columns
            order = columns.argsort(stable=True)
            starts = torch.cat([columns.new_zeros(1), torch.bincount(columns, minlength=len(codes)).cumsum(0)])
            grad_codes = torch.zeros_like(codes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                for h in range(values.shape[1]):
                    transposed = torch.sparse_csr_tensor(starts, rows[order], values[order, h],
                                                         (len(codes), ctx.n_rows), check_invariants=False)
                    grad_codes += transposed @ grad_rows[:, h]
        return grad_values, grad_codes, None, None, None


def pruned_pre_activations(suite: SCAESuite, model: Any, record: SuiteRecord, connections: Connections, name: str,
                           upstream_codes: dict[str, torch.Tensor], recompute_weights: bool = False) -> torch.Tensor:
    """Module `name`'s pre-activations `[batch, seq, dict_size]` from its connected upstream features only (with
    the given upstream codes), plus the embedding and bias terms, under the recorded run's norm scales and
    attention patterns. The connected upstream codes are summed with their virtual weights as one sparse product
    (`_connect`), so the cost scales with dict_size x C per token and the memory with the connected upstream
    features active in the batch, never with dict_size x n_upstream; attention SAEs sum per head at each key
    position, then mix the sums across positions with the pattern. Differentiable in the suite's parameters;
    `recompute_weights` derives the virtual weights from the current parameters (as training needs) instead of
    using the stored ones."""
    kind, layer = name.split("_")[0], int(name.split("_")[1])
    dense_terms = decompose(suite, model, record, name, upstream_codes={})
    pre = dense_terms["embedding"] + dense_terms["bias"]
    if not upstream_of(name) or connections.indices[name].shape[1] == 0:
        return pre
    batch, seq = pre.shape[:2]
    upstream = [upstream_codes[up].reshape(batch * seq, -1) for up in upstream_of(name)]
    indices = connections.indices[name]
    if recompute_weights:  # checkpointed: rebuilt in the backward pass rather than kept (the gathered decoder
        # blocks of 60 modules at full SmolLM2 depth would not fit in memory)
        weights = checkpoint(virtual_weights, suite, model, name, indices, use_reentrant=False)
    else:
        weights = connections.weights[name]
    summed = _connect(upstream, indices, weights)  # [tokens, dict_size] or [tokens, dict_size, heads]
    # every upstream feature at token t enters through the norm with the same scale s(t) (at the key, for attention)
    summed = summed * record.norm_scales[name].reshape(-1, *[1] * (summed.dim() - 1))
    if kind == "mlp":
        return pre + summed.view(batch, seq, -1)
    # head h at query q reads key k with weight P_h[q, k]
    per_head = summed.view(batch, seq, -1, summed.shape[-1])  # [batch, key, dict_size, heads]
    return pre + torch.einsum("bhqk,bkfh->bqf", record.patterns[layer], per_head)


def pruned_forward(suite: SCAESuite, model: Any, record: SuiteRecord, connections: Connections,
                   recompute_weights: bool = False) -> dict[str, torch.Tensor]:
    """Every module's TopK codes `[batch, seq, dict_size]`, computed in layer order from the pruned codes of its
    connected upstream features (never the clean ones), plus the embedding and bias terms."""
    connections.validate(suite)
    codes: dict[str, torch.Tensor] = {}
    for name in suite.names:
        pre = pruned_pre_activations(suite, model, record, connections, name, codes, recompute_weights)
        codes[name] = _topk_codes(pre, int(suite[name].k))
    return codes


@dataclass
class ContributionStatistics:
    """What mean contributions need, summed over `tokens` real tokens: per downstream module and upstream module,
    sum_t s(t) a_j(t) for transcoders (`[n_upstream_module]`) and, for attention SAEs, sum_q sum_k P_h[q, k] s(k)
    a_j(k) per head (`[heads, n_upstream_module]`)."""

    tokens: int
    sums: dict[str, dict[str, torch.Tensor]]


@torch.no_grad()
def contribution_statistics(suite: SCAESuite, model: Any, texts: Any, batch_size: int = 8, ctx_len: int = 128,
                            progress: bool = False) -> ContributionStatistics:
    """One pass of the suite over `texts` (any iterable of strings), keeping only per-upstream-feature sums: memory
    is a vector (per head) per module pair, whatever the number of texts."""
    from tqdm import tqdm

    texts = list(texts)
    if not texts:
        raise ValueError("contribution statistics need at least one text, got none")
    sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in suite.names}
    tokens = 0
    for start in tqdm(range(0, len(texts), batch_size), desc="contribution statistics", disable=not progress):
        record, _ = run_suite(suite, model, texts[start : start + batch_size], ctx_len=ctx_len, logits=False)
        mask = record.mask.to(torch.float32)
        tokens += int(mask.sum())
        for name in suite.names:
            kind, layer = name.split("_")[0], int(name.split("_")[1])
            if kind == "mlp":
                weight = record.norm_scales[name] * mask  # [batch, seq]
            else:  # how much each key position is read, summed over real queries, per head
                weight = torch.einsum("bhqk,bq,bk->bhk", record.patterns[layer], mask, record.norm_scales[name])
            for up in upstream_of(name):
                pattern = "bt,btj->j" if kind == "mlp" else "bhk,bkj->hj"
                sums[name][up] = sums[name].get(up, 0) + torch.einsum(pattern, weight, record.codes[up])
    return ContributionStatistics(tokens, sums)


@torch.no_grad()
def pair_contributions(suite: SCAESuite, model: Any, statistics: ContributionStatistics, name: str, up: str
                       ) -> torch.Tensor:
    """Mean contribution of each feature of `up` to each feature of `name`'s pre-activation, over the tokens of
    `statistics`: `[dict_size, up's dict_size]`. One module pair at a time, so selection never holds more."""
    kind, layer = name.split("_")[0], int(name.split("_")[1])
    if up not in upstream_of(name):
        raise ValueError(f"{up} is not upstream of {name}; upstream modules are {upstream_of(name)}")
    mean = statistics.sums[name][up] / max(statistics.tokens, 1)
    normed = _through_norm(norm_params(model, layer, kind), suite[up].decoder.weight.t())  # [n_up, d_model]
    encoder = suite[name].encoder.weight
    if kind == "mlp":
        return (encoder @ normed.t()) * mean
    ov = attention_ov(model, layer)
    values = torch.einsum("jd,hde->hje", normed, ov.W_V) * mean[..., None]  # [heads, n_up, d_head]
    return encoder @ torch.einsum("hje,hem->jm", values, ov.W_O).t()


@torch.no_grad()
def connections_from_statistics(suite: SCAESuite, model: Any, statistics: ContributionStatistics, C: int
                                ) -> Connections:
    """The top-C connections per feature by |mean contribution|, strongest first, with a running top-C across
    upstream modules (one `[dict_size, n_upstream_module]` matrix at a time)."""
    _check_C(C)
    indices, weights, scores, totals = {}, {}, {}, {}
    for name in suite.names:
        n_features = suite[name].dict_size
        best_values = torch.empty(n_features, 0)
        best_indices = torch.empty(n_features, 0, dtype=torch.long)
        totals[name] = torch.zeros(n_features)
        offset = 0
        for up in upstream_of(name):
            strength = pair_contributions(suite, model, statistics, name, up).abs()
            totals[name] += strength.sum(dim=1)
            values, local = strength.topk(min(C, strength.shape[1]), dim=1)
            merged_values = torch.cat([best_values, values], dim=1)
            merged_indices = torch.cat([best_indices, local + offset], dim=1)
            best_values, keep = merged_values.topk(min(C, merged_values.shape[1]), dim=1)  # sorted: strongest first
            best_indices = merged_indices.gather(1, keep)
            offset += suite[up].dict_size
        indices[name], scores[name] = best_indices, best_values
        weights[name] = virtual_weights(suite, model, name, best_indices)
    return Connections(indices, weights, scores, totals)


@torch.no_grad()
def select_connections(suite: SCAESuite, model: Any, texts: Any, C: int, batch_size: int = 8, ctx_len: int = 128,
                       progress: bool = False) -> Connections:
    """For every feature, the C upstream features (across all upstream modules) with the largest |mean
    contribution| over `texts`, stored as `[dict_size, C]` indices, strongest first (fewer where fewer exist), and
    their virtual weights. The embedding and bias terms are always kept, densely."""
    _check_C(C)
    statistics = contribution_statistics(suite, model, texts, batch_size=batch_size, ctx_len=ctx_len,
                                         progress=progress)
    return connections_from_statistics(suite, model, statistics, C)


@torch.no_grad()
def plot_connection_statistics(connections: Connections, path: str | Path) -> dict[str, float]:
    """Two histograms as a PNG: |mean contribution| of kept connections, and the share of each feature's total
    |mean contribution| its C connections capture. Returns the median share."""
    plt = pyplot()

    if connections.scores is None or connections.totals is None:
        raise ValueError("these connections carry no scores: make them with select_connections or "
                         "connections_from_statistics")
    kept, shares = [], []
    for name, chosen in connections.scores.items():
        if chosen.shape[1] == 0:
            continue
        kept.append(chosen.flatten())
        shares.append(chosen.sum(1) / connections.totals[name].clamp_min(1e-12))
    kept, shares = torch.cat(kept), torch.cat(shares)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.hist(kept.clamp_min(1e-12).log10().numpy(), bins=50)
    left.set_xlabel("log10 |mean contribution| of kept connections")
    left.set_ylabel("connections")
    right.hist(shares.numpy(), bins=40, range=(0, 1))
    right.set_xlabel("share of a feature's total |mean contribution| kept")
    right.set_ylabel("features")
    C = max(i.shape[1] for i in connections.indices.values())
    figure.suptitle(f"connections at C = {C}")
    figure.tight_layout()
    save_figure(figure, path)
    return {"median_share_kept": shares.median().item()}


def patched_logits(suite: SCAESuite, model: Any, encoding: dict[str, torch.Tensor],
                   codes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits with every attention output and MLP output replaced by the suite's reconstruction from `codes`, in
    one nnsight trace (differentiable in the codes and the decoders)."""
    adapter = get_adapter(model)
    with model.trace(model_inputs(encoding)):
        for layer in range(suite.n_layers):
            block = adapter.block(layer)
            attn = model.get(f"{block}.{adapter.attn}")
            output = attn.output
            attn.output = (suite[f"attn_{layer}"].decode(codes[f"attn_{layer}"]), *output[1:])
            model.get(f"{block}.{adapter.mlp}").output = suite[f"mlp_{layer}"].decode(codes[f"mlp_{layer}"])
        logits = model.output.logits.save()
    return logits


class _SuiteMetrics:
    """Token-weighted sums over evaluation batches: CE of the clean model, the dense suite and each set of pruned
    connections, and per module the squared error against the clean model's attention / MLP output and the L0."""

    def __init__(self) -> None:
        self.ce: dict[str, float] = {}
        self.ce_tokens = 0
        self.tokens = 0
        self.error: dict[tuple[str, str], float] = {}
        self.l0: dict[tuple[str, str], float] = {}
        self.target_sum: dict[str, torch.Tensor] = {}
        self.target_square: dict[str, float] = {}

    @torch.no_grad()
    def add(self, suite: SCAESuite, model: Any, texts: list[str], connection_sets: dict[str, Connections],
            ctx_len: int) -> None:
        from .evaluation import masked_cross_entropy

        encoding = tokenize(model.tokenizer, texts, ctx_len)
        record, dense_logits = run_suite(suite, model, texts, ctx_len=ctx_len)
        saved = clean_targets(suite, model, encoding, logits=True)
        logits, codes = {"clean": saved["logits"], "dense": dense_logits}, {"dense": record.codes}
        for label, connections in connection_sets.items():
            codes[label] = pruned_forward(suite, model, record, connections)
            logits[label] = patched_logits(suite, model, encoding, codes[label])
        for label, value in logits.items():
            ce, mask = masked_cross_entropy(value, encoding["input_ids"], encoding["attention_mask"])
            self.ce[label] = self.ce.get(label, 0.0) + ce[mask].sum().item()
        self.ce_tokens += int(mask.sum())
        mask = record.mask
        self.tokens += int(mask.sum())
        for name in suite.names:
            target = saved[name][mask]
            self.target_sum[name] = self.target_sum.get(name, 0) + target.sum(0)
            self.target_square[name] = self.target_square.get(name, 0.0) + target.pow(2).sum().item()
            for label, module_codes in codes.items():
                active = module_codes[name][mask]
                error = (suite[name].decode(active) - target).pow(2).sum().item()
                self.error[label, name] = self.error.get((label, name), 0.0) + error
                self.l0[label, name] = self.l0.get((label, name), 0.0) + (active > 0).sum().item()

    def result(self, label: str, key: str = "pruned") -> dict[str, Any]:
        """CE of the clean model, the dense suite and connection set `label` (as `ce_<key>`), and per module the
        FVU and L0 of the dense and the pruned codes."""
        result: dict[str, Any] = {"ce_clean": self.ce["clean"] / self.ce_tokens,
                                  "ce_dense": self.ce["dense"] / self.ce_tokens}
        if label in self.ce:
            result[f"ce_{key}"] = self.ce[label] / self.ce_tokens
        modules = {}
        for name, total in self.target_sum.items():
            variance = max(self.target_square[name] - total.pow(2).sum().item() / self.tokens, 1e-12)
            modules[name] = {f"{metric}_{out}": value for source, out in (("dense", "dense"), (label, key))
                             if (source, name) in self.error
                             for metric, value in (("fvu", self.error[source, name] / variance),
                                                   ("l0", self.l0[source, name] / self.tokens))}
        result["modules"] = modules
        return result


@torch.no_grad()
def evaluate_suite(suite: SCAESuite, model: Any, texts: list[str], connections: Connections | None = None,
                   batch_size: int = 8, ctx_len: int = 128, progress: bool = False) -> dict[str, Any]:
    """Next-token CE (mean over real tokens) of the clean model, with the dense suite patched in (every attention
    output and MLP output replaced by its module's reconstruction) and, given connections, with the pruned suite
    patched in; and under "modules", per module, the FVU of its reconstruction against the clean model's attention /
    MLP output and its L0, for the dense and the pruned codes."""
    from tqdm import tqdm

    texts = list(texts)
    if not texts:
        raise ValueError("evaluate_suite needs at least one text, got none")
    metrics = _SuiteMetrics()
    sets = {"pruned": connections} if connections is not None else {}
    for start in tqdm(range(0, len(texts), batch_size), desc="evaluating suite", disable=not progress):
        metrics.add(suite, model, texts[start : start + batch_size], sets, ctx_len)
    return metrics.result("pruned")


def suite_cross_entropy(suite: SCAESuite, model: Any, texts: list[str], connections: Connections | None = None,
                        ctx_len: int = 128, batch_size: int = 8) -> dict[str, float]:
    """`ce_clean`, `ce_dense` and (given connections) `ce_pruned` of `evaluate_suite`."""
    result = evaluate_suite(suite, model, texts, connections, batch_size=batch_size, ctx_len=ctx_len)
    return {key: value for key, value in result.items() if key.startswith("ce_")}


# --------------------------------------------------------------------------------------------------------------
# fine-tuning through the pruned forward pass


def save_connections(connections: Connections, path: str | Path) -> None:
    """Indices, virtual weights (and scores / totals where present) in one safetensors file, written atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for field in ("indices", "weights", "scores", "totals"):
        for name, tensor in (getattr(connections, field) or {}).items():
            tensors[f"{name}.{field}"] = tensor.detach().contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_connections(path: str | Path) -> Connections:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    fields: dict[str, dict[str, torch.Tensor]] = {"indices": {}, "weights": {}, "scores": {}, "totals": {}}
    for key, tensor in tensors.items():
        name, field = key.rsplit(".", 1)
        fields[field][name] = tensor
    return Connections(fields["indices"], fields["weights"], fields["scores"] or None, fields["totals"] or None)


@torch.no_grad()
def clean_targets(suite: SCAESuite, model: Any, encoding: dict[str, torch.Tensor], logits: bool = False
                  ) -> dict[str, torch.Tensor]:
    """What each module should reconstruct, from the clean model: attention outputs and MLP outputs (and, with
    `logits=True`, the clean logits under "logits"; otherwise the pass stops after the suite's last layer)."""
    adapter = get_adapter(model)
    saved = {}
    with model.trace(model_inputs(encoding)) as tracer:
        for layer in range(suite.n_layers):
            block = adapter.block(layer)
            saved[f"attn_{layer}"] = read_value(model.get(f"{block}.{adapter.attn}").output).save()
            saved[f"mlp_{layer}"] = read_value(model.get(f"{block}.{adapter.mlp}").output).save()
        if logits:
            saved["logits"] = model.output.logits.save()
        else:
            tracer.stop()
    return saved


class SCAETrainer:
    """Fine-tunes a suite through the pruned forward pass on local MSE (each module's pruned reconstruction against
    the clean model's attention / MLP output, as a fraction of its variance, summed over modules) and downstream CE
    (every pruned reconstruction patched into the model in one nnsight trace, CE backpropagated into the suite).
    The linearisation (norm scales, attention patterns) is that of the run with the dense suite patched in, taken
    without gradient each step; the virtual weights are recomputed from the current parameters."""

    def __init__(self, suite: SCAESuite, model: Any, connections: Connections, steps: int, lr: float = 1e-4,
                 mse_weight: float = 1.0, ce_weight: float = 1.0, warmup_steps: int = 0, ctx_len: int = 128,
                 seed: int = 0):
        from .trainers.trainer import check_steps, lr_schedule

        check_steps(steps)
        if mse_weight < 0 or ce_weight < 0 or mse_weight + ce_weight == 0:
            raise ValueError(f"mse_weight and ce_weight must be >= 0 and not both 0, got {mse_weight}, {ce_weight}")
        suite.check_model(model)
        connections.validate(suite)
        torch.manual_seed(seed)
        self.suite, self.model, self.connections = suite, model, connections
        self.mse_weight, self.ce_weight, self.ctx_len = mse_weight, ce_weight, ctx_len
        for parameter in model._module.parameters():
            parameter.requires_grad_(False)  # only the suite trains
        self.optimizer = torch.optim.Adam(suite.parameters(), lr=lr)
        self.decoder_norms = {name: module.decoder.weight.detach().norm(dim=0, keepdim=True).clone()
                              for name, module in suite.dictionaries.items()}
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(steps, warmup_steps))
        self.config = {"steps": steps, "lr": lr, "mse_weight": mse_weight, "ce_weight": ce_weight,
                       "warmup_steps": warmup_steps, "ctx_len": ctx_len, "seed": seed}
        self.last_metrics: dict[str, float] = {}

    def loss(self, texts: list[str]) -> torch.Tensor:
        from .evaluation import masked_cross_entropy

        suite, model = self.suite, self.model
        encoding = tokenize(model.tokenizer, texts, self.ctx_len)
        with torch.no_grad():
            record, _ = run_suite(suite, model, texts, ctx_len=self.ctx_len, logits=False)
        targets = clean_targets(suite, model, encoding)
        codes = pruned_forward(suite, model, record, self.connections, recompute_weights=True)
        mask = record.mask
        mse = torch.zeros(())
        for name in suite.names:
            target = targets[name][mask]
            error = (suite[name].decode(codes[name][mask]) - target).pow(2).sum()
            mse = mse + error / (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = self.mse_weight * mse
        metrics = {"fvu_sum": mse.item(), "l0": sum((codes[n][mask] > 0).sum(-1).float().mean().item()
                                                     for n in suite.names) / len(suite.names)}
        if self.ce_weight:
            ce, ce_mask = masked_cross_entropy(patched_logits(suite, model, encoding, codes),
                                               encoding["input_ids"], encoding["attention_mask"])
            ce = ce[ce_mask].mean()
            loss = loss + self.ce_weight * ce
            metrics["ce"] = ce.item()
        self.last_metrics = {"loss": loss.item(), **metrics}
        return loss

    def update(self, step: int, texts: list[str]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(texts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.suite.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():  # keep each decoder column at its starting norm (unit for TopK-trained modules,
            # c_in / c_out for transcoders whose training normalisation was folded in)
            for name, module in self.suite.dictionaries.items():
                weight = module.decoder.weight
                weight *= self.decoder_norms[name] / weight.norm(dim=0, keepdim=True).clamp_min(1e-8)
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {"suite": self.suite.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.suite.load_state_dict(state["suite"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def train_scae_suite(suite: SCAESuite, model: Any, texts: Any, connections: Connections, steps: int,
                     batch_texts: int = 8, save_dir: str | Path | None = None, checkpoint_steps: int | None = None,
                     resume: bool = False, log_steps: int | None = None, use_wandb: bool = False,
                     wandb_project: str = "dictionary_learning", progress: bool = True, **trainer_kwargs
                     ) -> SCAETrainer:
    """Fine-tune `suite` for `steps` steps on batches of `batch_texts` texts from the iterator `texts`, with a tqdm
    bar, optional wandb logging ($WANDB_MODE, offline by default), atomic checkpoints in `save_dir` and
    `resume=True` continuing from the last one (the consumed text batches are skipped). At the end the suite's
    `connections` hold the tuned connections' virtual weights, and the suite (with them) is saved to
    `save_dir/suite`. The scores and totals are those of the selection, before fine-tuning."""
    import itertools
    import os

    from tqdm import tqdm

    trainer = SCAETrainer(suite, model, connections, steps, **trainer_kwargs)
    texts = iter(texts)
    save_dir = Path(save_dir) if save_dir is not None else None
    checkpoint_steps = checkpoint_steps or max(1, steps // 10)
    start = 0
    if resume:
        if save_dir is None:
            raise ValueError("resume=True needs the save_dir of the interrupted run")
        path = save_dir / "checkpoint.pt"
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=False)
            trainer.load_state_dict(state["trainer"])
            start = state["step"]
            for _ in range(start * batch_texts):
                next(texts)
    run = None
    if use_wandb:
        import wandb

        run = wandb.init(project=wandb_project, mode=os.environ.get("WANDB_MODE", "offline"), config=trainer.config,
                         dir=str(save_dir) if save_dir else None)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="fine-tuning suite", disable=not progress)
    for step in bar:
        batch = list(itertools.islice(texts, batch_texts))
        if not batch:
            break
        trainer.update(step, batch)
        metrics = trainer.last_metrics
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        if run is not None and log_steps and step % log_steps == 0:
            run.log(metrics, step=step)
        if save_dir is not None and (step + 1) % checkpoint_steps == 0:
            state = {"trainer": trainer.state_dict(), "step": step + 1}
            atomic_write(save_dir / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
    bar.close()
    if run is not None:
        run.finish()
    with torch.no_grad():  # the virtual weights of the fine-tuned parameters
        suite.connections = Connections(connections.indices, {name: virtual_weights(suite, model, name, idx)
                                                              for name, idx in connections.indices.items()},
                                        connections.scores, connections.totals)
    if save_dir is not None:
        suite.save(save_dir / "suite")
    return trainer


# --------------------------------------------------------------------------------------------------------------
# CE against C


@torch.no_grad()
def ce_versus_c(suite: SCAESuite, model: Any, selection_texts: list[str] | None, eval_texts: list[str],
                Cs: list[int], batch_size: int = 8, ctx_len: int = 128, progress: bool = False,
                connections: Connections | None = None) -> list[dict[str, Any]]:
    """Select connections on `selection_texts` (once, at the largest C: the top C for a smaller C are its first
    C; or pass `connections` already selected at the largest C or more) and measure, on `eval_texts`, CE of the
    clean model, the dense suite and the suite pruned to each C (C larger than a module's upstream count keeps them
    all, which is the dense suite), with per-module FVU and L0. One row per C."""
    from tqdm import tqdm

    if not Cs:
        raise ValueError("Cs must list at least one C")
    for C in Cs:
        _check_C(C)
    if connections is None:
        statistics = contribution_statistics(suite, model, selection_texts, batch_size=batch_size, ctx_len=ctx_len,
                                             progress=progress)
        connections = connections_from_statistics(suite, model, statistics, max(Cs))
    elif connections.scores is None:
        raise ValueError("ce_versus_c needs selected connections (strongest first, with scores): make them with "
                         "select_connections")
    for name in suite.names:
        needed = min(max(Cs), sum(suite[up].dict_size for up in upstream_of(name)))
        if connections.indices[name].shape[1] < needed:
            raise ValueError(f"{name}: C = {max(Cs)} needs {needed} connections per feature, the connections given "
                             f"have {connections.indices[name].shape[1]}")
    strongest = connections
    sets = {str(C): strongest.top(C) for C in Cs}
    metrics = _SuiteMetrics()
    for start in tqdm(range(0, len(eval_texts), batch_size), desc="CE against C", disable=not progress):
        metrics.add(suite, model, eval_texts[start : start + batch_size], sets, ctx_len)
    return [{"C": C, **metrics.result(str(C))} for C in Cs]


def ce_table(rows: list[dict[str, Any]], label: str = "") -> str:
    """A markdown table of ce_versus_c rows (with the pruned suite's FVU averaged over modules)."""
    lines = [f"| C | CE clean | CE dense suite | CE pruned suite{' ' + label if label else ''} | mean FVU pruned |",
             "|---|---|---|---|---|"]
    for r in rows:
        fvu = sum(m["fvu_pruned"] for m in r["modules"].values()) / len(r["modules"])
        lines.append(f"| {r['C']} | {r['ce_clean']:.4f} | {r['ce_dense']:.4f} | {r['ce_pruned']:.4f} | {fvu:.3f} |")
    return "\n".join(lines)


def module_table(result: dict[str, Any], label: str = "") -> str:
    """A markdown table of the per-module FVU and L0 in an `evaluate_suite` result or a `ce_versus_c` row."""
    lines = [f"| module{' (' + label + ')' if label else ''} | FVU dense | FVU pruned | L0 dense | L0 pruned |",
             "|---|---|---|---|---|"]
    for name, m in result["modules"].items():
        lines.append(f"| {name} | {m['fvu_dense']:.3f} | {m.get('fvu_pruned', float('nan')):.3f} | "
                     f"{m['l0_dense']:.1f} | {m.get('l0_pruned', float('nan')):.1f} |")
    return "\n".join(lines)


def plot_ce_versus_c(curves: dict[str, list[dict[str, float]]], path: str | Path) -> None:
    """CE of the pruned suite against C (log scale) for each labelled curve, with the clean and dense CEs."""
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(7, 4))
    for label, rows in curves.items():
        line, = axis.plot([r["C"] for r in rows], [r["ce_pruned"] for r in rows], marker="o", label=f"pruned, {label}")
        axis.axhline(rows[0]["ce_dense"], color=line.get_color(), linestyle=":", label=f"dense suite, {label}")
    first = next(iter(curves.values()))
    axis.axhline(first[0]["ce_clean"], color="black", linestyle="--", label="clean model")
    axis.set_xscale("log")
    axis.set_xlabel("C (upstream connections per feature)")
    axis.set_ylabel("next-token CE (nats)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)

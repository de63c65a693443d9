"""Sparsely connected autoencoders (SCAE): a suite of attention-output SAEs and MLP transcoders, one of each per
layer, in which every feature is computed from a few upstream features.

Work in progress (issue 4). In place: the `SCAESuite` container (save / load as one folder); `run_suite`, which
patches every module's reconstruction into the model in one nnsight trace and records what the linearisation
needs; `decompose`, the exact linear decomposition of every module's encoder pre-activations into
per-upstream-module terms plus an embedding term and a bias term; connection selection by mean contribution; the
pruned forward pass; CE of the clean model and the dense / pruned suites, against C; and fine-tuning
(`SCAETrainer`, `train_scae_suite`) on local MSE and downstream CE.

Linearisation. With the norm scales s(t) (1 / rms, after centring for LayerNorm) and the attention patterns
P_h[q, k] held fixed at their values in the recorded run, a downstream encoder row e_F receives from upstream
feature j (decoder column d_j, activation a_j):
- into a transcoder at layer L:      a_j(t) * s(t) * e_F . (w_norm * C d_j)
- into an attention SAE at layer L:  sum_h sum_k P_h[q, k] * s(k) * a_j(k) * e_F . ((w_norm * C d_j) W_V^h W_O^h)
where C centres (LayerNorm) or is the identity (RMSNorm). The embedding (with learned positions, for GPT-2) and the
biases (upstream b_dec, the norm's bias, b_V, b_O, the encoder's own bias and b_dec) make up the rest, so that with
every upstream feature kept the decomposition equals the dense pre-activation of the recorded run exactly.
The recorded run is the one with the suite's reconstructions patched in (not the clean model's), so the
decomposition is exact for the computation the suite actually performs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .buffer import model_inputs, tokenize
from .dictionary import Dictionary, TopKDictionary
from .models import attention_ov, get_adapter, n_layers, norm_params, read_value
from .utils import atomic_write, atomic_write_json, load_dictionary, save_dictionary


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

    def __init__(self, modules: dict[str, Dictionary], model_name: str | None = None):
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
        directory = Path(directory)
        for name, module in self.dictionaries.items():
            save_dictionary(module, directory / name)
        atomic_write_json(directory / "suite.json", {"modules": self.names, "model_name": self.model_name})
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "SCAESuite":
        directory = Path(directory)
        if not (directory / "suite.json").exists():
            raise ValueError(f"{str(directory)!r} is not a saved SCAESuite (no suite.json)")
        meta = json.loads((directory / "suite.json").read_text())
        modules = {name: load_dictionary(directory / name, device=device)[0] for name in meta["modules"]}
        return cls(modules, model_name=meta.get("model_name"))


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
    `[dict_size, C]` for transcoders, `[dict_size, C, n_heads]` for attention SAEs (one per head)."""

    indices: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]

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
            if self.weights[name].shape[:2] != indices.shape:
                raise ValueError(f"{name}: weights of shape {tuple(self.weights[name].shape)} do not match indices "
                                 f"{tuple(indices.shape)}")


def _upstream_decoder(suite: SCAESuite, name: str) -> torch.Tensor:
    """Decoder columns of every upstream feature as rows, concatenated in upstream order: `[n_upstream, d_model]`."""
    columns = [suite[up].decoder.weight.t() for up in upstream_of(name)]
    return torch.cat(columns) if columns else suite[name].encoder.weight.new_zeros(0, suite[name].activation_dim)


def virtual_weights(suite: SCAESuite, model: Any, name: str, indices: torch.Tensor) -> torch.Tensor:
    """e_F . (w_norm * C d_j) for transcoders, e_F . ((w_norm * C d_j) W_V^h W_O^h) per head for attention SAEs,
    for every feature F and its connected upstream features j = indices[F]."""
    kind, layer = name.split("_")[0], int(name.split("_")[1])
    encoder = suite[name].encoder.weight  # [dict_size, d_model]
    normed = _through_norm(norm_params(model, layer, kind), _upstream_decoder(suite, name))  # [n_up, d_model]
    if kind == "mlp":  # in chunks of features, so the gathered [features, C, d_model] block stays small
        return torch.cat([torch.einsum("fd,fcd->fc", encoder[start : start + 256], normed[indices[start : start + 256]])
                          for start in range(0, len(indices), 256)]) if len(indices) else normed.new_zeros(0, 0)
    ov = attention_ov(model, layer)
    # per head, meet in the d_head-wide middle: (e_F W_O^h^T) . (w C d_j W_V^h)
    reads = torch.einsum("fm,hem->hfe", encoder, ov.W_O)  # [heads, dict_size, d_head]
    writes = torch.einsum("jd,hde->hje", normed, ov.W_V)  # [heads, n_up, d_head]
    return torch.stack([torch.einsum("fe,fce->fc", reads[h], writes[h][indices]) for h in range(len(reads))], dim=-1)


@torch.no_grad()
def all_connections(suite: SCAESuite, model: Any) -> Connections:
    """Every feature connected to every upstream feature (C = all): the pruned pass then equals the dense one."""
    indices, weights = {}, {}
    for name in suite.names:
        n_up = sum(suite[up].dict_size for up in upstream_of(name))
        indices[name] = torch.arange(n_up).expand(suite[name].dict_size, n_up).contiguous()
        weights[name] = virtual_weights(suite, model, name, indices[name])
    return Connections(indices, weights)


def _topk_codes(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = pre.relu().topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


def _connect(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[..., F] = sum_c weights[F, c] * x[..., indices[F, c]] as one sparse-dense product: the connection matrix
    [dict_size, n_columns] has dict_size * C non-zeros, and no [..., dict_size, C] tensor is built."""
    n_features, C = indices.shape
    if C == 0:
        return x.new_zeros(*x.shape[:-1], n_features)
    rows = torch.arange(n_features).repeat_interleave(C)
    matrix = torch.sparse_coo_tensor(torch.stack([rows, indices.flatten()]), weights.flatten(),
                                     (n_features, x.shape[-1]), check_invariants=False)
    flat = x.reshape(-1, x.shape[-1])  # [tokens, n_columns]
    return torch.sparse.mm(matrix, flat.t()).t().reshape(*x.shape[:-1], n_features)


def pruned_pre_activations(suite: SCAESuite, model: Any, record: SuiteRecord, connections: Connections, name: str,
                           upstream_codes: dict[str, torch.Tensor], recompute_weights: bool = False) -> torch.Tensor:
    """Module `name`'s pre-activations `[batch, seq, dict_size]` from its connected upstream features only (with
    the given upstream codes), plus the embedding and bias terms, under the recorded run's norm scales and
    attention patterns. Cost scales with dict_size x C per token (plus attention-mixing the upstream features
    that are active in the batch); no n_features x n_upstream matrix is built. Differentiable in the suite's
    parameters; `recompute_weights` derives the virtual weights from the current parameters (as training needs)
    instead of using the stored ones."""
    kind, layer = name.split("_")[0], int(name.split("_")[1])
    dense_terms = decompose(suite, model, record, name, upstream_codes={})
    pre = dense_terms["embedding"] + dense_terms["bias"]
    if not upstream_of(name):
        return pre
    upstream = torch.cat([upstream_codes[up] for up in upstream_of(name)], dim=-1)  # [batch, seq, n_up]
    scaled = upstream * record.norm_scales[name][..., None]
    indices = connections.indices[name]
    weights = virtual_weights(suite, model, name, indices) if recompute_weights else connections.weights[name]
    if kind == "mlp":
        return pre + _connect(scaled, indices, weights)
    # attention-mix only the upstream features active somewhere in the batch; the rest contribute nothing
    active = (scaled.detach() != 0).flatten(0, 1).any(dim=0).nonzero().flatten()
    lookup = torch.full((scaled.shape[-1],), len(active), dtype=torch.long)
    lookup[active] = torch.arange(len(active))
    mixed = torch.einsum("bhqk,bkj->bhqj", record.patterns[layer], scaled[..., active])
    mixed = torch.cat([mixed, mixed.new_zeros(*mixed.shape[:-1], 1)], dim=-1)  # a zero column for inactive ones
    positions = lookup[indices]  # [dict_size, C]
    for head in range(mixed.shape[1]):
        pre = pre + _connect(mixed[:, head], positions, weights[..., head])
    return pre


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


@torch.no_grad()
def mean_contributions(suite: SCAESuite, model: Any, texts: list[str], batch_size: int = 8, ctx_len: int = 128,
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """Per downstream module, per upstream module, the mean over real tokens of each (feature, upstream feature)
    contribution to the pre-activation: `[dict_size, upstream dict_size]` matrices, built from per-upstream-feature
    statistics (mean of s(t) a_j(t), attention-mixed per head for attention SAEs) so memory stays at one such
    matrix per module pair."""
    sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in suite.names}
    tokens = 0
    for start in range(0, len(texts), batch_size):
        record, _ = run_suite(suite, model, texts[start : start + batch_size], ctx_len=ctx_len, logits=False)
        mask = record.mask.to(torch.float32)
        tokens += int(mask.sum())
        for name in suite.names:
            kind, layer = name.split("_")[0], int(name.split("_")[1])
            scale = record.norm_scales[name] * mask if kind == "mlp" else record.norm_scales[name]
            if kind == "attn":  # sum over real queries of P[q, k]: how much each key position is read
                reads = torch.einsum("bhqk,bq->bhk", record.patterns[layer], mask)
            for up in upstream_of(name):
                codes = record.codes[up]
                if kind == "mlp":
                    stat = torch.einsum("bt,btj->j", scale, codes)
                else:
                    stat = torch.einsum("bhk,bk,bkj->hj", reads, scale, codes)
                sums[name][up] = sums[name].get(up, 0) + stat
    result: dict[str, dict[str, torch.Tensor]] = {}
    for name in suite.names:
        kind, layer = name.split("_")[0], int(name.split("_")[1])
        norm = norm_params(model, layer, kind)
        encoder = suite[name].encoder.weight
        result[name] = {}
        for up, total in sums[name].items():
            mean = total / max(tokens, 1)
            normed = _through_norm(norm, suite[up].decoder.weight.t())  # [n_up, d_model]
            if kind == "mlp":
                result[name][up] = (encoder @ normed.t()) * mean
            else:
                ov = attention_ov(model, layer)
                folded = torch.einsum("hj,jd,hde,hem->jm", mean, normed, ov.W_V, ov.W_O)  # sum_h mean_h * d_j OV_h
                result[name][up] = encoder @ folded.t()
    return result


@torch.no_grad()
def select_connections(suite: SCAESuite, model: Any, texts: list[str], C: int, batch_size: int = 8,
                       ctx_len: int = 128) -> Connections:
    """For every feature, the C upstream features (across all upstream modules) with the largest |mean
    contribution| over `texts`, stored as `[dict_size, C]` indices (fewer where fewer exist) and virtual weights."""
    if not isinstance(C, int) or C <= 0:
        raise ValueError(f"C must be a positive int, got {C!r}")
    contributions = mean_contributions(suite, model, texts, batch_size=batch_size, ctx_len=ctx_len)
    return connections_from_contributions(suite, model, contributions, C)


@torch.no_grad()
def connections_from_contributions(suite: SCAESuite, model: Any, contributions: dict[str, dict[str, torch.Tensor]],
                                   C: int) -> Connections:
    """The top-C connections per feature from `mean_contributions` output (a running top-C across upstream
    modules, one [dict_size, n_upstream_module] matrix at a time)."""
    if not isinstance(C, int) or C <= 0:
        raise ValueError(f"C must be a positive int, got {C!r}")
    indices, weights = {}, {}
    for name in suite.names:
        n_features = suite[name].dict_size
        best_values = torch.empty(n_features, 0)
        best_indices = torch.empty(n_features, 0, dtype=torch.long)
        offset = 0
        for up in upstream_of(name):
            scores = contributions[name][up].abs()
            values, local = scores.topk(min(C, scores.shape[1]), dim=1)
            merged_values = torch.cat([best_values, values], dim=1)
            merged_indices = torch.cat([best_indices, local + offset], dim=1)
            keep = merged_values.topk(min(C, merged_values.shape[1]), dim=1).indices
            best_values, best_indices = merged_values.gather(1, keep), merged_indices.gather(1, keep)
            offset += suite[up].dict_size
        indices[name] = best_indices.sort(dim=1).values
        weights[name] = virtual_weights(suite, model, name, indices[name])
    return Connections(indices, weights)


@torch.no_grad()
def plot_connection_statistics(suite: SCAESuite, contributions: dict[str, dict[str, torch.Tensor]],
                               connections: Connections, path: str | Path) -> dict[str, float]:
    """Two histograms as a PNG: |mean contribution| of kept connections, and the share of each feature's total
    |mean contribution| its C connections capture. Returns the median share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, shares = [], []
    for name in suite.names:
        if not upstream_of(name):
            continue
        scores = torch.cat([contributions[name][up].abs() for up in upstream_of(name)], dim=1)
        chosen = scores.gather(1, connections.indices[name])
        kept.append(chosen.flatten())
        shares.append(chosen.sum(1) / scores.sum(1).clamp_min(1e-12))
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
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
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


@torch.no_grad()
def suite_cross_entropy(suite: SCAESuite, model: Any, texts: list[str], connections: Connections | None = None,
                        ctx_len: int = 128) -> dict[str, float]:
    """Next-token CE of the clean model, with the dense suite patched in (every attention output and MLP output
    replaced by its module's reconstruction) and, given connections, with the pruned suite patched in."""
    from .evaluation import masked_cross_entropy

    encoding = tokenize(model.tokenizer, texts, ctx_len)
    record, dense_logits = run_suite(suite, model, texts, ctx_len=ctx_len)
    with model.trace(model_inputs(encoding)):
        clean_logits = model.output.logits.save()
    results = {}
    logits = {"clean": clean_logits, "dense": dense_logits}
    if connections is not None:
        codes = pruned_forward(suite, model, record, connections)
        logits["pruned"] = patched_logits(suite, model, encoding, codes)
    for key, value in logits.items():
        ce, mask = masked_cross_entropy(value, encoding["input_ids"], encoding["attention_mask"])
        results[f"ce_{key}"] = ce[mask].mean().item()
    return results


# --------------------------------------------------------------------------------------------------------------
# fine-tuning through the pruned forward pass


def save_connections(connections: Connections, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}.indices": t.contiguous() for name, t in connections.indices.items()}
    tensors |= {f"{name}.weights": t.detach().contiguous() for name, t in connections.weights.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_connections(path: str | Path) -> Connections:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    names = {key.rsplit(".", 1)[0] for key in tensors}
    return Connections({n: tensors[f"{n}.indices"] for n in names}, {n: tensors[f"{n}.weights"] for n in names})


@torch.no_grad()
def clean_targets(suite: SCAESuite, model: Any, encoding: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What each module should reconstruct, from the clean model: attention outputs and MLP outputs."""
    adapter = get_adapter(model)
    saved = {}
    with model.trace(model_inputs(encoding)) as tracer:
        for layer in range(suite.n_layers):
            block = adapter.block(layer)
            saved[f"attn_{layer}"] = read_value(model.get(f"{block}.{adapter.attn}").output).save()
            saved[f"mlp_{layer}"] = read_value(model.get(f"{block}.{adapter.mlp}").output).save()
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
        from .trainers.trainer import lr_schedule

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
    `resume=True` continuing from the last one (the consumed text batches are skipped). The fine-tuned suite and
    its connections are saved to `save_dir` at the end."""
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
    if save_dir is not None:
        with torch.no_grad():
            final = Connections(connections.indices, {name: virtual_weights(suite, model, name, idx)
                                                      for name, idx in connections.indices.items()})
        suite.save(save_dir / "suite")
        save_connections(final, save_dir / "connections.safetensors")
    return trainer


# --------------------------------------------------------------------------------------------------------------
# CE against C


@torch.no_grad()
def ce_versus_c(suite: SCAESuite, model: Any, selection_texts: list[str], eval_texts: list[str], Cs: list[int],
                batch_size: int = 8, ctx_len: int = 128) -> list[dict[str, float]]:
    """For each C, select connections on `selection_texts` and measure CE on `eval_texts` of the clean model, the
    dense suite and the suite pruned to C (C larger than a module's upstream count keeps them all)."""
    rows = []
    for C in Cs:
        connections = select_connections(suite, model, selection_texts, C, batch_size=batch_size, ctx_len=ctx_len)
        totals: dict[str, float] = {}
        batches = 0
        for start in range(0, len(eval_texts), batch_size):
            for key, value in suite_cross_entropy(suite, model, eval_texts[start : start + batch_size], connections,
                                                  ctx_len=ctx_len).items():
                totals[key] = totals.get(key, 0.0) + value
            batches += 1
        rows.append({"C": C, **{key: value / batches for key, value in totals.items()}})
    return rows


def ce_table(rows: list[dict[str, float]], label: str = "") -> str:
    """A markdown table of ce_versus_c rows."""
    lines = [f"| C | CE clean | CE dense suite | CE pruned suite{' ' + label if label else ''} |", "|---|---|---|---|"]
    lines += [f"| {r['C']} | {r['ce_clean']:.4f} | {r['ce_dense']:.4f} | {r['ce_pruned']:.4f} |" for r in rows]
    return "\n".join(lines)


def plot_ce_versus_c(curves: dict[str, list[dict[str, float]]], path: str | Path) -> None:
    """CE of the pruned suite against C (log scale) for each labelled curve, with the clean and dense CEs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)

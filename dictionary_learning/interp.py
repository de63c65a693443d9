"""Looking at one feature (or one model dimension): its top-activating contexts and tokens, its
effect on the next token when ablated, and a UMAP map of all features (upstream's `interp` module,
on this toolkit's tracing door).

Inputs are left padded, so position -1 is every row's last real token; padding never counts as a
context or token.
"""

from __future__ import annotations

import random
from collections import namedtuple
from functools import partial
from typing import Any

import torch

from .dictionary import Dictionary
from .evaluation import encode_inputs
from .grad_pursuit import dictionary_atoms
from .models import resolve_hook
from .tracing import read_hook_points, run

FeatureProfile = namedtuple("featureProfile", ["top_contexts", "top_tokens", "top_affected"])


def _through(dictionary: Dictionary, x: torch.Tensor, feature: int | None,
             add_residual: bool) -> torch.Tensor:
    """x `[batch, seq, d]` replaced by the dictionary's reconstruction, with `feature` zeroed at the
    last position (None: nothing ablated) and, with add_residual, the reconstruction error added
    back."""
    param = next(dictionary.parameters())
    flat = x.reshape(-1, x.shape[-1]).to(param.dtype)
    reconstruction, f = dictionary(flat, output_features=True)
    out = reconstruction
    if feature is not None:
        f = f.reshape(*x.shape[:-1], -1).clone()
        f[:, -1, feature] = 0
        f = f.reshape(flat.shape[0], -1)
        out = (dictionary.decode(f, flat) if getattr(dictionary, "skip", None) is not None
               else dictionary.decode(f))
    if add_residual:
        out = out + (flat - reconstruction)
    return out.reshape(x.shape).to(x.dtype)


@torch.no_grad()
def feature_effect(
    model: Any,
    submodule: Any,
    dictionary: Dictionary | None,
    feature: int,
    inputs: Any,
    max_length: int = 128,
    add_residual: bool = True,
    k: int = 10,
    largest: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids `[k]`, values `[k]`): the next tokens whose log-probability at the last position
    drops most (`largest=False`: rises most) when `feature` is zeroed there, averaged over the
    inputs.

    With a dictionary, the submodule's output is replaced by its reconstruction with the feature
    zeroed (plus the reconstruction error if add_residual; without it, the clean run goes through
    the dictionary too). Without one, `feature` is a dimension of the output itself. inputs: texts,
    token ids or lists of token ids.
    """
    point = resolve_hook(model, submodule, "output")
    width = dictionary.d_sae if dictionary is not None else None
    if width is not None and not 0 <= feature < width:
        raise ValueError(f"feature must be in [0, {width - 1}], got {feature!r}")
    encoding = encode_inputs(model, inputs, max_length)

    def ablated(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, -1, feature] = 0
        return x

    def last_logprobs(ablate: bool) -> torch.Tensor:
        patch = {}
        if dictionary is not None and (ablate or not add_residual):
            patch = {point: partial(_through, dictionary, feature=feature if ablate else None,
                                    add_residual=add_residual)}
        elif ablate:
            patch = {point: ablated}
        logits = run(model, encoding, patch=patch).logits
        return logits[:, -1].float().log_softmax(dim=-1)  # [batch, vocab]

    difference = last_logprobs(False) - last_logprobs(True)
    values, tokens = difference.mean(dim=0).topk(k, largest=largest)
    return tokens, values


def _render_contexts(tokens: list[list[str]], activations: list[torch.Tensor]) -> Any:
    """circuitsvis's text_neuron_activations view where circuitsvis is installed, else
    (tokens, activations) pairs."""
    try:
        from circuitsvis.activations import text_neuron_activations
    except ImportError:
        return [(words, values.tolist()) for words, values in zip(tokens, activations)]
    return text_neuron_activations(tokens, [values[:, None, None] for values in activations])


@torch.no_grad()
def examine_dimension(
    model: Any,
    submodule: Any,
    buffer: Any,
    dictionary: Dictionary | None = None,
    max_length: int = 128,
    n_inputs: int = 512,
    dim_idx: int | None = None,
    k: int = 30,
) -> FeatureProfile:
    """A profile of one feature of `dictionary` (or, without one, one dimension of the submodule's
    output) on the next `n_inputs` texts of `buffer` (an ActivationBuffer, or texts):
    `featureProfile(top_contexts, top_tokens, top_affected)`.

    top_contexts: the k contexts ending at its strongest activations (a circuitsvis view where
    installed, else (tokens, activations) pairs); top_tokens: the k tokens with the highest mean
    activation, as (token, mean);
    top_affected: `feature_effect` on those contexts, as (token, log-probability drop). dim_idx:
    default random.
    """
    point = resolve_hook(model, submodule, "output")
    if hasattr(buffer, "tokenized_batch"):
        encoding = buffer.tokenized_batch(batch_size=n_inputs)
    else:
        encoding = encode_inputs(model, list(buffer)[:n_inputs], max_length)
    [x] = read_hook_points(model, encoding, [point])  # [batch, seq, d]
    if dictionary is not None:
        param = next(dictionary.parameters())
        x = dictionary.encode(x.reshape(-1, x.shape[-1]).to(param.dtype)).reshape(*x.shape[:-1], -1)
    if dim_idx is None:
        dim_idx = random.randint(0, x.shape[-1] - 1)
    if not 0 <= dim_idx < x.shape[-1]:
        raise ValueError(f"dim_idx must be in [0, {x.shape[-1] - 1}], got {dim_idx!r}")
    acts = x[..., dim_idx].float()  # [batch, seq]
    ids, mask = (encoding["input_ids"].to(acts.device),
                 encoding["attention_mask"].bool().to(acts.device))
    decode = model.tokenizer.decode

    # mean activation of each distinct token over its real occurrences
    distinct, where = ids[mask].unique(return_inverse=True)
    sums = torch.zeros(len(distinct), device=acts.device).index_add_(0, where, acts[mask])
    means = sums / torch.bincount(where, minlength=len(distinct))
    order = means.argsort(descending=True)[:k]
    top_tokens = [(decode(int(distinct[i])), means[i].item()) for i in order]

    # the contexts ending at the strongest activations
    flat = acts.masked_fill(~mask, -torch.inf).flatten()
    strongest = flat.argsort(descending=True)[: min(k, int(mask.sum()))]
    contexts, context_acts = [], []
    for index in strongest.tolist():
        row, position = divmod(index, acts.shape[1])
        first = int(mask[row].int().argmax())
        contexts.append(ids[row, first : position + 1].tolist())
        context_acts.append(acts[row, first : position + 1].cpu())
    top_contexts = _render_contexts([[decode(t) for t in c] for c in contexts], context_acts)

    tokens, values = feature_effect(model, submodule, dictionary, dim_idx, contexts,
                                    max_length=max_length, k=k)
    top_affected = [(decode(int(t)), v.item()) for t, v in zip(tokens, values)]
    return FeatureProfile(top_contexts, top_tokens, top_affected)


def _feature_vectors(dictionary: Dictionary, weight: str) -> torch.Tensor:
    """One row per feature `[d_sae, d]`: its encoder direction or its decoder atom."""
    if weight == "decoder":
        return dictionary_atoms(dictionary)[0].T
    encoder = getattr(dictionary, "encoder", None)
    if isinstance(encoder, torch.nn.Linear):
        return encoder.weight
    if isinstance(getattr(dictionary, "W_enc", None), torch.Tensor):
        return dictionary.W_enc.T
    raise TypeError(f"{type(dictionary).__name__} has neither an `encoder` Linear layer nor a "
                    "`W_enc` matrix")


def feature_umap(
    dictionary: Dictionary,
    weight: str = "decoder",
    n_neighbors: int = 15,
    metric: str = "cosine",
    min_dist: float = 0.05,
    n_components: int = 2,
    feat_idxs: int | list[int] | None = None,
) -> Any:
    """A plotly scatter (3-D for n_components=3) of a UMAP embedding of the features' decoder atoms
    (or encoder directions, weight="encoder"), hovering shows the feature index; `feat_idxs` are
    drawn red, the rest blue. Needs the optional packages umap-learn and plotly."""
    try:
        import plotly.express as px
        import umap
    except ImportError as error:
        raise ImportError("feature_umap needs the optional packages 'umap-learn' and 'plotly': "
                          "pip install umap-learn plotly") from error
    if weight not in ("encoder", "decoder"):
        raise ValueError(f"weight must be 'encoder' or 'decoder', got {weight!r}")
    if n_components not in (2, 3):
        raise ValueError(f"n_components must be 2 or 3, got {n_components!r}")
    with torch.no_grad():
        vectors = _feature_vectors(dictionary, weight).detach().float().cpu().numpy()
    reducer = umap.UMAP(n_neighbors=n_neighbors, metric=metric, min_dist=min_dist,
                        n_components=n_components)
    embedding = reducer.fit_transform(vectors)
    chosen = {feat_idxs} if isinstance(feat_idxs, int) else set(feat_idxs or ())
    colors = None if feat_idxs is None else ["red" if i in chosen else "blue"
                                             for i in range(len(vectors))]
    names = list(range(len(vectors)))
    if n_components == 2:
        return px.scatter(x=embedding[:, 0], y=embedding[:, 1], hover_name=names, color=colors)
    return px.scatter_3d(x=embedding[:, 0], y=embedding[:, 1], z=embedding[:, 2], hover_name=names,
                         color=colors)

"""The suite and its connections: module names and which modules feed which, `SCAESuite` (an
attention SAE and a transcoder per layer; saved and loaded as one folder) and `Connections` (per
feature, the source features it reads and their virtual weights; saved as one safetensors
file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import integer, renamed_keywords
from ..dictionary import AutoEncoderTopK, Dictionary
from ..files import atomic_folder, atomic_write, atomic_write_json, read_json
from ..formats.hooks import site_hooks
from ..models import buffer_io, d_model, model_fingerprint, n_layers, torch_model
from ..models.adapters import parallel_residual
from ..utils import download_from_hub, load_dictionary, push_to_hub, save_dictionary

CONNECTION_FIELDS = ("indices", "weights", "scores", "totals")
# names the wing renamed: the earlier modules whose features a module reads are its sources
# ("upstream" means Marks' dictionary_learning in this package)
RENAMED = {"upstream_of": "sources_of", "n_upstream": "n_sources"}


def renamed_error(owner: str, name: str) -> AttributeError:
    """The AttributeError for `owner.name`, naming its new name when the wing renamed it."""
    if name in RENAMED:
        return AttributeError(f"{owner}.{name} was renamed {RENAMED[name]} (a module's sources are "
                              "the earlier modules whose features it reads)")
    return AttributeError(f"module {owner!r} has no attribute {name!r}")


def __getattr__(name: str) -> Any:  # upstream_of
    raise renamed_error(__name__, name)


def module_names(n_layer: int) -> list[str]:
    """The suite's modules in execution order: attn_0, mlp_0, attn_1, mlp_1, ..."""
    return [f"{kind}_{layer}" for layer in range(n_layer) for kind in ("attn", "mlp")]


def parse_module_name(name: str) -> tuple[str, int]:
    """("attn" | "mlp", layer) of a module name such as "mlp_3"."""
    kind, _, layer = name.partition("_")
    if kind not in ("attn", "mlp") or not layer.isdigit():
        raise ValueError(f"SCAE module names are 'attn_<layer>' or 'mlp_<layer>', got {name!r}")
    return kind, int(layer)


def _suite_entry(name: str) -> bool:
    """Whether a folder entry belongs to a saved suite (its modules, connections and suite.json)."""
    if name in ("suite.json", "connections.safetensors"):
        return True
    try:
        parse_module_name(name)
    except ValueError:
        return False
    return True


def sources_of(name: str, model: Any = None) -> list[str]:
    """Modules whose outputs reach `name`'s input: everything earlier in execution order. Given the
    `model`, a parallel-residual family (attention and MLP both read the block input) drops the same
    layer's attention from an MLP's list; without it (or for a sequential block) the list is the
    same."""
    kind, layer = parse_module_name(name)
    order = module_names(layer + 1)
    sources = order[: order.index(name)]
    if kind == "mlp" and model is not None and parallel_residual(model):
        sources.remove(f"attn_{layer}")
    return sources


def check_C(C: Any) -> None:
    integer("C", C)


def module_config(name: str, model_name: str | None) -> dict[str, Any]:
    """A module's config.json beyond its dictionary's own: the model, layer and hook points it reads
    and writes (attn_L: layers.L.attn_out; mlp_L: layers.L.mlp_in -> layers.L.mlp_out), so its
    folder exports and opens in the dashboard like any trained dictionary's (hook paths only where
    the model's family is known offline)."""
    kind, layer = parse_module_name(name)
    trainer: dict[str, Any] = {"layer": layer, "submodule_name": name,
                               **({"lm_name": model_name} if model_name
                                                                         else {})}
    sites = ("attn_out",) if kind == "attn" else ("mlp_in", "mlp_out")
    hooks = site_hooks(model_name, layer, sites)
    if not hooks:
        return {"trainer": trainer}
    names = [hook["name"] for hook in hooks]
    return {"trainer": trainer,
            "buffer": {"hooks": hooks, "submodule": names[0] if len(names) == 1 else names,
                       "io": buffer_io([hook["io"] for hook in hooks])}}


class SCAESuite(nn.Module):
    """Per-layer TopK attention SAEs (attn_out -> attn_out) and TopK transcoders (mlp_in
    -> mlp_out)."""

    def __init__(self, modules: dict[str, Dictionary], model_name: str | None = None,
                 connections: "Connections | None" = None, model_fingerprint: str | None = None):
        super().__init__()
        if not modules:
            raise ValueError("an SCAESuite needs at least one module")
        layers = 1 + max(parse_module_name(name)[1] for name in modules)
        expected = module_names(layers)
        if sorted(modules) != sorted(expected):
            raise ValueError("an SCAESuite needs an attention SAE and a transcoder on every layer: "
                             f"expected {expected}, got {sorted(modules)}")
        for name, module in modules.items():
            # BatchTopK / Matryoshka select over the batch or by groups
            if not isinstance(module, AutoEncoderTopK):
                raise TypeError(f"{name}: SCAE modules are AutoEncoderTopK dictionaries (per-token "
                                "TopK, whose pruned pass with every connection kept is exactly the "
                                f"dense suite), got {type(module).__name__}")
            if module.skip is not None:
                raise ValueError(f"{name}: transcoders with a skip connection are not supported in "
                                 "an SCAE")
            if name.startswith("attn") and module.transcoder:
                raise ValueError(f"{name}: attention modules are SAEs (not transcoders)")
            # its decoder bias would count twice
            if name.startswith("mlp") and not module.transcoder:
                raise ValueError(f"{name}: MLP modules are transcoders (mlp_in -> mlp_out), got an "
                                 "SAE (transcoder=False)")
        self.names = expected
        self.dictionaries = nn.ModuleDict({name: modules[name] for name in expected})
        self.model_name = model_name
        # the model the suite was trained or connected on (models.model_fingerprint): another one is
        # refused
        self.model_fingerprint = model_fingerprint
        self.n_layers = layers
        self.connections = connections  # the suite's selected connections, saved and loaded with it
        if connections is not None:
            connections.validate(self)

    def __getitem__(self, name: str) -> Dictionary:
        return self.dictionaries[name]

    def __getattr__(self, name: str) -> Any:
        if name == "n_upstream":
            raise renamed_error(type(self).__name__, name)
        return super().__getattr__(name)

    def n_sources(self, name: str, model: Any = None) -> int:
        """How many source features module `name` can read: the features of
        `sources_of(name, model)`."""
        return sum(self[source].d_sae for source in sources_of(name, model))

    def check_model(self, model: Any) -> None:
        """Clear errors for a suite whose widths or depth do not match the model, or that was
        trained or connected on another model (of the same shape: its `model_fingerprint` differs).
        The first model a suite meets is recorded."""
        width = d_model(model)
        if self.n_layers > n_layers(model):
            raise ValueError(f"the suite has {self.n_layers} layers, the model {n_layers(model)}")
        mine, theirs = next(self.parameters()).dtype, next(torch_model(model).parameters()).dtype
        if mine != theirs:  # the linearisation multiplies the suite's weights by the model's
            raise ValueError(f"the suite's parameters are {str(mine).removeprefix('torch.')}, the "
                             f"model's {str(theirs).removeprefix('torch.')}: load the model with "
                             f"dtype=torch.{str(mine).removeprefix('torch.')} (or convert the "
                             "suite with suite.to(...))")
        for name, module in self.dictionaries.items():
            if module.d_in != width or module.d_out != width:
                raise ValueError(f"{name} maps {module.d_in} -> {module.d_out}, but "
                                 f"the model's width is {width}")
        fingerprint = model_fingerprint(model)
        if (None not in (self.model_fingerprint, fingerprint)
                and fingerprint != self.model_fingerprint):
            raise ValueError("the suite was trained or connected on another model than this "
                             f"one{f' ({self.model_name})' if self.model_name else ''}: their "
                             f"weights differ (model fingerprint {fingerprint}, the suite's "
                             f"{self.model_fingerprint}); load that model")
        self.model_fingerprint = self.model_fingerprint or fingerprint

    @classmethod
    @renamed_keywords(dict_size="d_sae")
    def random(cls, model: Any, d_sae: int, k: int, n_layer: int | None = None,
               seed: int = 0) -> "SCAESuite":
        """An untrained suite for `model` (all layers, or the first `n_layer`) of `d_sae` features
        per module."""
        width = d_model(model)
        torch.manual_seed(seed)
        modules = {name: AutoEncoderTopK(width, d_sae, k, transcoder=name.startswith("mlp"))
                   for name in module_names(n_layer or n_layers(model))}
        return cls(modules, model_fingerprint=model_fingerprint(model))

    def save(self, directory: str | Path) -> Path:
        """One folder: a dictionary folder per module (upstream's ae.pt + config.json format), the
        connections (connections.safetensors, if set) and suite.json, replaced as a whole (a reader
        sees the previous save or this one, never a mix; entries that are not part of a suite, e.g.
        a checkpoint, are kept)."""
        directory = Path(directory)
        with atomic_folder(directory, owned=_suite_entry) as staging:
            for name, module in self.dictionaries.items():
                save_dictionary(module, staging / name, module_config(name, self.model_name))
            if self.connections is not None:
                save_connections(self.connections, staging / "connections.safetensors")
            atomic_write_json(staging / "suite.json",
                              {"modules": self.names, "model_name": self.model_name,
                               "model_fingerprint": self.model_fingerprint,
                               "connections": self.connections is not None})
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "SCAESuite":
        directory = Path(directory)
        if not (directory / "suite.json").exists():
            raise ValueError(f"{str(directory)!r} is not a saved SCAESuite (no suite.json)")
        meta = read_json(directory / "suite.json", expect=dict)
        names = meta.get("modules")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"{str(directory / 'suite.json')!r}: 'modules' must list the module "
                             f"names, got {names!r}")
        # before any is read: a name is a folder inside the suite's, never a path out of it
        for name in names:
            parse_module_name(name)
        modules = {name: load_dictionary(directory / name, device=device)[0] for name in names}
        connections = None
        if meta.get("connections"):
            if not (directory / "connections.safetensors").exists():
                raise ValueError(f"{str(directory / 'suite.json')!r} names connections, but "
                                 f"connections.safetensors is missing")
            connections = load_connections(directory / "connections.safetensors")
        try:
            return cls(modules, model_name=meta.get("model_name"), connections=connections,
                       model_fingerprint=meta.get("model_fingerprint"))
        # suite.json, the modules and the connections disagree
        except (ValueError, TypeError) as error:
            raise ValueError(f"{str(directory)!r} is not a consistent SCAESuite: "
                             f"{error}") from error


    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False,
                    path_in_repo: str | None = None,
                    commit_message: str = "Upload SCAE suite") -> str:
        """Upload the suite (modules, connections, suite.json: the folder `save` writes) to a
        Hugging Face model repo (created if missing); returns the commit URL."""
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            folder = self.save(Path(scratch) / "suite")
            return push_to_hub(folder, repo_id, token=token, private=private,
                               path_in_repo=path_in_repo, commit_message=commit_message)

    @classmethod
    def from_hub(cls, repo_id: str, subfolder: str | None = None, revision: str | None = None,
                 device: str = "cpu", token: str | None = None) -> "SCAESuite":
        """A suite pushed with `push_to_hub` (or any folder `save` wrote, uploaded), downloaded (or
        from the local cache) and loaded with its connections."""
        return cls.load(download_from_hub(repo_id, subfolder, revision, token), device=device)


@dataclass
class Connections:
    """For each module, the source features each of its features reads: `indices[name]`
    `[d_sae, C]` into the concatenation of `sources_of(name, model)`'s features (in
    that order), and their virtual weights `weights[name]`: `[d_sae, C]` for transcoders,
    `[d_sae, C, n_heads]` for attention SAEs (one per head). Selected connections come strongest
    first in each row (so `top(C)` keeps the C strongest), with `scores[name]` `[d_sae, C]`
    their |mean contribution| and `totals[name]` `[d_sae]` each feature's total |mean
    contribution| over all of its source features."""

    indices: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor] | None = None
    totals: dict[str, torch.Tensor] | None = None
    # drawn at random (`random_connections`), in random order, not strongest first
    random: bool = False
    # `parameter_fingerprint` of the suite whose parameters the weights were computed from
    # (None: unknown)
    fingerprint: str | None = None

    def validate(self, suite: SCAESuite, model: Any = None, weights: bool = True) -> None:
        """Clear errors for connections that do not fit the suite (source counts for `model`, when
        given); with `weights`, also for virtual weights that are not finite or were computed from
        other parameters (skip it where they are recomputed from the suite's current parameters, as
        fine-tuning does)."""
        for name in suite.names:
            if name not in self.indices:
                raise ValueError(f"no connections for module {name}")
            if name not in self.weights:
                raise ValueError(f"no connection weights for module {name}")
            indices, n_sources = self.indices[name], suite.n_sources(name, model)
            if (not isinstance(indices, torch.Tensor)
                    or indices.dtype not in (torch.int64, torch.int32)):
                raise TypeError(f"{name}: connection indices must be an int64 (or int32) tensor, "
                                f"got {getattr(indices, 'dtype', type(indices).__name__)}")
            if indices.dim() != 2 or indices.shape[0] != suite[name].d_sae:
                raise ValueError(f"{name}: expected indices of shape [{suite[name].d_sae}, C], "
                                 f"got {tuple(indices.shape)}")
            if indices.numel() and (indices.min() < 0 or indices.max() >= n_sources):
                raise ValueError(f"{name}: connection indices must lie in [0, {n_sources}), got "
                                 f"[{int(indices.min())}, {int(indices.max())}]")
            if indices.shape[1] > 1 and (indices.sort(dim=1).values.diff(dim=1) == 0).any():
                raise ValueError(f"{name}: a feature lists the same source feature twice")
            if self.weights[name].shape[:2] != indices.shape:
                raise ValueError(f"{name}: weights of shape {tuple(self.weights[name].shape)} do "
                                 f"not match indices {tuple(indices.shape)}")
            if weights and not torch.isfinite(self.weights[name]).all():
                raise ValueError(f"{name}: the connections' virtual weights hold NaN / inf")
        if (weights and self.fingerprint is not None
                and self.fingerprint != parameter_fingerprint(suite)):
            raise ValueError("the connections' virtual weights were computed from other parameters "
                             "than the suite's (it was trained or changed since): select them "
                             "again (select_connections, random_connections) or fine-tune with "
                             "train_scae_suite, which recomputes them")

    def top(self, C: int) -> "Connections":
        """The first C connections of every feature: the C strongest, for selected connections (a
        random C of them, for random ones)."""
        check_C(C)

        def first(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if tensors is None else {name: t[:, :C] for name, t in tensors.items()}

        return Connections(first(self.indices), first(self.weights), first(self.scores),
                           self.totals, self.random, self.fingerprint)


def parameter_fingerprint(suite: SCAESuite) -> str:
    """A short hash of every module's parameters (their shapes, sums, sums of squares and a strided
    sample of their values): what connections' virtual weights were computed from, so stale ones are
    refused."""
    import hashlib

    digest = hashlib.sha256()
    with torch.no_grad():
        for name in suite.names:
            for key, parameter in suite[name].named_parameters():
                values = parameter.detach().double().flatten()
                sample = values[:: max(1, values.numel() // 4096)].float().cpu().numpy().tobytes()
                digest.update(f"{name}.{key}:{tuple(parameter.shape)}:{values.sum().item():.17g}:"
                              f"{values.square().sum().item():.17g}".encode() + sample)
    return digest.hexdigest()[:16]


def save_connections(connections: Connections, path: str | Path) -> None:
    """Indices, virtual weights (and scores / totals where present) in one safetensors file, written
    atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for field in CONNECTION_FIELDS:
        for name, tensor in (getattr(connections, field) or {}).items():
            tensors[f"{name}.{field}"] = tensor.detach().contiguous()
    metadata = {"fingerprint": connections.fingerprint} if connections.fingerprint else None
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_connections(path: str | Path) -> Connections:
    from safetensors import safe_open
    from safetensors.torch import load_file

    fields: dict[str, dict[str, torch.Tensor]] = {field: {} for field in CONNECTION_FIELDS}
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            fingerprint = (handle.metadata() or {}).get("fingerprint")
    except Exception as error:
        raise ValueError(f"cannot read connections from {str(path)!r} (corrupt or truncated?): "
                         f"{error}") from error
    for key, tensor in tensors.items():
        name, _, field = key.rpartition(".")
        if field not in fields:
            raise ValueError(f"{str(path)!r} holds {key!r}; expected "
                             f"'<module>.<{'|'.join(CONNECTION_FIELDS)}>' keys")
        fields[field][name] = tensor
    return Connections(fields["indices"], fields["weights"], fields["scores"] or None,
                       fields["totals"] or None, fingerprint=fingerprint)

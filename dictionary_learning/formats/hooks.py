"""Hook points across libraries. This toolkit reads a module's input or output (`{"path", "io"}`,
paths in the Hugging Face model); SAELens hooks Hugging Face modules' outputs only, sparsify names
modules inside the base model (without its `model.` / `transformer.` prefix), and circuit-tracer
names TransformerLens-style hooks per layer. An MLP's input is the output of the norm before it,
which the family adapter names."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from ..models.adapters import ADAPTERS, SITES, FamilyAdapter

# this toolkit's offline aliases -> hub ids
HUB_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@lru_cache(maxsize=32)
def model_type(model_name: str | None) -> str | None:
    """config.model_type of a model name this toolkit can load (smollm2-135m, a tiny model, a local
    folder, a hub id in the local cache), or None when it cannot be found offline."""
    if not model_name:
        return None
    model_name = {hub: alias for alias, hub in HUB_NAMES.items()}.get(model_name, model_name)
    from ..models.loading import DEFAULT_MODEL, TINY_MODELS, smollm2_path, tiny_hf_model

    if model_name in TINY_MODELS:
        return tiny_hf_model(model_name)[0].config.model_type
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(smollm2_path()) if model_name == DEFAULT_MODEL
                                          else model_name).model_type
    except Exception:  # not local, hub unreachable: the caller asks for an explicit name
        return None


def _adapters(path: str, model_name: str | None) -> list[FamilyAdapter]:
    """The family adapters that could own `path`: the model's own when its family is known, else
    every adapter whose block list is a prefix of the path."""
    family = model_type(model_name)
    if family in ADAPTERS:
        return [ADAPTERS[family]]
    return list({id(a): a for a in ADAPTERS.values()
                 if path.startswith(a.layers + ".") or not path}.values())


def _block_and_rest(adapter: FamilyAdapter, path: str) -> tuple[int, str] | None:
    match = re.fullmatch(re.escape(adapter.layers) + r"\.(\d+)(?:\.(.+))?", path)
    return (int(match.group(1)), match.group(2) or "") if match else None


def output_path(hook: dict[str, Any], model_name: str | None) -> str:
    """The module whose output is this hook point's value: the path itself for an output; for an
    MLP's input, the norm that feeds the MLP. Other inputs cannot be named by output-only hook
    systems: a ValueError asks for the name explicitly."""
    if hook.get("io", "output") == "output":
        return hook["path"]
    found = set()
    for adapter in _adapters(hook["path"], model_name):
        place = _block_and_rest(adapter, hook["path"])
        if place and place[1] == adapter.mlp:
            found.add(f"{adapter.block(place[0])}.{adapter.mlp_norm}")
    if len(found) == 1:
        return found.pop()
    why = "families disagree on which norm feeds it" if found else "it is not an MLP's input"
    raise ValueError(f"the input of {hook['path']!r} is not any module's output that can be named "
                     f"({why}); pass the hook name explicitly (hook_name= / --hook-name)")


def site_name(hook: dict[str, Any], model_name: str | None) -> str | None:
    """This toolkit's name of a hook point (`layers.6.mlp_out`) when it is one of a family's named
    sites, else None (or when families that could own the path disagree)."""
    names = set()
    for adapter in _adapters(hook["path"], model_name):
        place = _block_and_rest(adapter, hook["path"])
        for site in SITES if place else ():
            if adapter.site_path(place[0], site) == (hook["path"], hook.get("io", "output")):
                names.add(f"layers.{place[0]}.{site}")
    return names.pop() if len(names) == 1 else None


def site_hooks(model_name: str | None, layer: int, sites: tuple[str, ...]) -> list[dict[str, Any]]:
    """`{"path", "io", "name"}` of named sites at a layer of a model this toolkit can place offline
    (its family known), else []."""
    adapters = _adapters("", model_name) if model_type(model_name) in ADAPTERS else []
    if len(adapters) != 1:
        return []
    paths = [adapters[0].site_path(layer, site) for site in sites]
    return [{"path": path, "io": io, "name": f"layers.{layer}.{site}"}
            for (path, io), site in zip(paths, sites)]


def named_hooks(hooks: list[dict[str, Any]], model_name: str | None) -> list[dict[str, Any]]:
    """`{"path", "io", "name"}` for each hook: its saved name, else its site name, else none."""
    named = []
    for hook in hooks:
        entry = {"path": hook["path"], "io": hook.get("io", "output")}
        name = hook.get("name") or site_name(entry, model_name)
        named.append({**entry, "name": name} if name else entry)
    return named


def input_hook(path: str, model_name: str | None) -> dict[str, str]:
    """This toolkit's hook for a module output read as a dictionary's input: an MLP norm's output is
    read as the MLP's input (the same value), anything else as the module's output."""
    for adapter in _adapters(path, model_name):
        place = _block_and_rest(adapter, path)
        if place and place[1] == adapter.mlp_norm:
            return {"path": f"{adapter.block(place[0])}.{adapter.mlp}", "io": "input"}
    return {"path": path, "io": "output"}


def base_prefix(path: str, model_name: str | None) -> str:
    """The base model's attribute in a causal-LM path (`model.` for Llama, `transformer.` for
    GPT-2), which sparsify's hookpoints (named inside the base model) leave out; "" if the path has
    none."""
    for adapter in _adapters(path, model_name):
        if "." in adapter.layers and path.startswith(adapter.layers.split(".")[0] + "."):
            return adapter.layers.split(".")[0] + "."
    return ""


def mlp_layer(hooks: list[dict[str, Any]], model_name: str | None) -> int | None:
    """The layer of a transcoder that reads an MLP's input (or the norm feeding it) and writes that
    MLP's output, else None."""
    if len(hooks) != 2 or hooks[1].get("io", "output") != "output":
        return None
    for adapter in _adapters(hooks[0]["path"], model_name):
        source, target = (_block_and_rest(adapter, hooks[0]["path"]),
                          _block_and_rest(adapter, hooks[1]["path"]))
        if not source or not target or source[0] != target[0] or target[1] != (adapter.mlp_out
                                                                               or adapter.mlp):
            continue
        if (source[1], hooks[0].get("io", "output")) in ((adapter.mlp, "input"),
                                                         (adapter.mlp_norm, "output")):
            return source[0]
    return None


def full_path(inner: str, model_name: str | None) -> str | None:
    """The causal-LM path of a module named inside the base model (sparsify's hookpoints:
    `layers.6.mlp`), or None when the family cannot be told apart offline (`layers.` is Llama's
    `model.layers` and GPT-NeoX's `gpt_neox.layers`)."""
    found = set()
    for adapter in (_adapters("", model_name) if model_type(model_name) in ADAPTERS
                    else ADAPTERS.values()):
        base, _, blocks = adapter.layers.rpartition(".")
        if base and (inner == blocks or inner.startswith(blocks + ".")):
            found.add(f"{base}.{inner}")
    return found.pop() if len(found) == 1 else None


def mlp_hooks(layer: int, model_name: str | None) -> list[dict[str, str]]:
    """This toolkit's hooks for layer `layer`'s MLP transcoder (the MLP's input, its output), or []
    when the family cannot be told offline."""
    found = {(a.block(layer) + "." + a.mlp, a.block(layer) + "." + (a.mlp_out or a.mlp))
             for a in _adapters("", model_name)}
    if len(found) != 1:
        return []
    source, target = found.pop()
    return [{"path": source, "io": "input"}, {"path": target, "io": "output"}]

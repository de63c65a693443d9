"""Every public name of upstream dictionary_learning (PyPI 0.1.0 and GitHub HEAD 60ec6bf) imports
from the same path here, with a signature that takes upstream's calls: its positional parameters in
its order, its keyword-only ones, and nothing more required. The truth is
`tests/data/upstream_api.json`, read off upstream's source with `ast` (module, name, kind, and each
function's / method's parameters)."""

import importlib
import inspect
import json
from pathlib import Path

import pytest

API = json.loads((Path(__file__).parents[1] / "data" / "upstream_api.json").read_text())
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

# where this toolkit's signature deliberately differs from upstream's, and why (also in the README's
# table)
DECODE = ("decode(f, x=None) on every class: the codes are `f` (upstream names them `x` on its "
          "TopK classes) and x is the input, which skip transcoders need; positional calls are the "
          "same")
KNOWN_DIFFERENCES = {
    "AutoEncoderTopK.decode": DECODE,
    "BatchTopKSAE.decode": DECODE,
    "MatryoshkaBatchTopKSAE.decode": DECODE,
}


def entries():
    """Each upstream name once; where HEAD changed a signature (e.g. TopKTrainer's `k_anneal_steps`
    before `seed`), HEAD's."""
    seen = set()
    for version, modules in sorted(API.items(), key=lambda item: item[0] != "HEAD"):
        for module, names in modules.items():
            for name, spec in names.items():
                if (module, name) not in seen:
                    seen.add((module, name))
                    yield pytest.param(module, name, spec, id=f"{module}.{name}")


def signature_problems(obj, spec) -> list[str]:
    """How `obj`'s signature fails to take upstream's calls described by `spec` (empty: it
    takes them)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []  # builtins without a signature (e.g. torch.autograd.Function.apply)
    params = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
    positional = [p.name for p in params if p.kind in POSITIONAL]
    names = {p.name for p in params}
    forwards_all = any(p.kind is p.VAR_POSITIONAL for p in params) and any(p.kind is p.VAR_KEYWORD
                                                                           for p in params)
    takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    problems = []
    for i, name in enumerate(spec["positional"]):
        if not forwards_all and (i >= len(positional) or positional[i] != name):
            problems.append(f"positional #{i} is {name!r} upstream, "
                            f"{positional[i] if i < len(positional) else 'missing'!r} here")
    for name in spec["keyword_only"]:
        if name not in names and not takes_any_keyword:
            problems.append(f"keyword {name!r} missing")
    upstream_names = set(spec["positional"]) | set(spec["keyword_only"])
    for p in params:
        if spec["varargs"] and p.kind in POSITIONAL:
            continue  # upstream takes any positional arguments (e.g. `download_loop(*args)`)
        if (p.default is p.empty and p.kind in (*POSITIONAL, p.KEYWORD_ONLY)
                and p.name not in upstream_names):
            problems.append(f"{p.name!r} is required here, not upstream")
    return problems


@pytest.mark.parametrize("module, name, spec", entries())
def test_upstream_name_takes_upstream_calls(module, name, spec):
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"{module}.{name} is missing"
    obj = getattr(mod, name)
    problems = []
    if spec["kind"] == "function":
        problems += signature_problems(obj, spec)
    elif spec["kind"] == "class":
        assert inspect.isclass(obj), f"{module}.{name} is not a class"
        for method, method_spec in spec["methods"].items():
            key = f"{name}.{method}"
            if key in KNOWN_DIFFERENCES:
                continue
            if not hasattr(obj, method):
                problems.append(f"{key} missing")
            elif "property" not in method_spec["decorators"]:
                problems += [f"{key}: {p}"
                             for p in signature_problems(getattr(obj, method), method_spec)]
    problems = [p for p in problems if f"{name}: {p}" not in KNOWN_DIFFERENCES]
    assert not problems, f"{module}.{name}: " + "; ".join(problems)


def test_known_differences_are_still_differences():
    """Each listed difference names a real upstream method (so the list cannot silently cover a
    typo)."""
    methods = {f"{name}.{method}" for modules in API.values() for names in modules.values()
               for name, spec in names.items() if spec["kind"] == "class"
               for method in spec["methods"]}
    functions = {name for modules in API.values() for names in modules.values() for name in names}
    for key in KNOWN_DIFFERENCES:
        assert key.split(":")[0] in methods | functions, key

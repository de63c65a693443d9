"""The house rules of ARCHITECTURE.md, read off the source: imports only go down the floors, nnsight is imported in
one place and traced through one door, and family knowledge stays in the models package."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dictionary_learning"

# ARCHITECTURE.md's floors; inside the SCAE wing, the order of its rooms
FLOORS = {
    "files": 0, "checks": 0, "sparse": 0, "models.adapters": 0, "config": 0, "progress": 0,
    "dictionary": 1, "grad_pursuit": 1, "data": 1, "models.hooks": 1, "models.loading": 1, "models": 1,
    "tracing": 2, "trainers": 2, "trainers.trainer": 2, "trainers.standard": 2, "trainers.top_k": 2, "utils": 2,
    "formats.weights": 2, "formats.hooks": 2,
    "buffer": 3, "training": 3, "activault_s3_buffer": 3, "formats": 3, "core_metrics": 3,
    "evaluation": 4, "cache": 4, "pytorch_buffer": 4,
    "scae": 5, "interp": 5,
    "dashboard": 6,
    "reports": 7,
    "__main__": 8, "__init__": 8,
}
WING = ["suite", "kernels", "tracing", "pruned", "selection", "evaluation", "training", "modules"]


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        yield ".".join(parts), path


def internal_imports(name, path):
    """The package modules that `name` imports (relative imports), as dotted names."""
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                yield ".".join([*base, node.module])
            else:  # from . import x
                yield from (".".join([*base, alias.name]) for alias in node.names)


def floor(name):
    while name not in FLOORS and "." in name:
        name = name.rsplit(".", 1)[0]
    return FLOORS[name]


def test_imports_only_go_down():
    seen = set()
    for name, path in modules():
        seen.add(name)
        for target in internal_imports(name, path):
            if target in ("", "__init__") or target == name:
                continue
            if name.startswith("scae.") and target.startswith("scae."):
                room, other = name.split(".")[1], target.split(".")[1]
                assert WING.index(other) < WING.index(room), f"scae.{room} imports scae.{other}, a room below it"
            elif name.split(".")[0] == target.split(".")[0]:
                continue  # within one package (models/, trainers/): a package's __init__ gathers its rooms
            elif name not in ("__main__", "__init__"):
                assert floor(target) < floor(name), f"{name} (floor {floor(name)}) imports {target} " \
                                                    f"(floor {floor(target)})"
    assert {f"scae.{room}" for room in WING} <= seen


def test_nnsight_is_imported_in_one_place():
    importers = [name for name, path in modules() if re.search(r"^\s*(from|import) nnsight", path.read_text(), re.M)]
    assert importers == ["models.loading"]


def test_family_knowledge_stays_in_the_models_package():
    leaks = re.compile(r"n_embd|hidden_size|num_attention_heads|nn\.LayerNorm|kind == \"(layer|rms)\"|\._module\b")
    for name, path in modules():
        if not name.startswith("models"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                assert not leaks.search(line), f"{path.name}:{number}: {line.strip()}"


def test_traces_are_opened_at_the_door_only():
    """`.trace(` (an nnsight trace) appears in tracing.py only, and in its one named exception:
    the SCAE wing's record pass, `scae.tracing.run_suite`, which records what the door hides."""
    exceptions = {"scae.tracing": "run_suite"}
    for name, path in modules():
        source = path.read_text()
        if name == "tracing" or ".trace(" not in source:
            continue
        allowed = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name == exceptions.get(name):
                allowed |= set(range(node.lineno, node.end_lineno + 1))
        for number, line in enumerate(source.splitlines(), 1):
            assert ".trace(" not in line or number in allowed, f"{name}:{number}: {line.strip()}"

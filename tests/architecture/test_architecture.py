"""ARCHITECTURE.md against the source. The map is read as data: its floor table and the SCAE wing's
list are the import order the source must keep, every path it names must exist, every module and
room of the package (and every test folder) must appear in it, and the rules it states (one importer
of nnsight, one door for traces, family knowledge in one package, modules that import nothing of the
package, the line limit) hold. So the map and the package cannot drift apart silently; the last test
checks that these checks do fail on a map that is wrong."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dictionary_learning"
TESTS = ROOT / "tests"
DOC = (ROOT / "ARCHITECTURE.md").read_text()

# a path the map names: `dir/`, `dir/file.py`, `file.py` (also `template.html`), not
# `module.attribute`
PATH = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:py|html)|(?:[\w.-]+/)+)(?![\w/-])")
# "floor 3 buffer/": a room's name starts here; its description's further lines start further in
NAME_COLUMN = 9


# ---- ARCHITECTURE.md read as data ----

def code_blocks(doc: str) -> list[tuple[str, str, str]]:
    """(the heading it is under, the line just before it, its text) for each fenced block."""
    blocks, heading, before, inside = [], "", "", None
    for line in doc.splitlines():
        if line.startswith("```"):
            if inside is None:
                inside = []
            else:
                blocks.append((heading, before, "\n".join(inside)))
                inside = None
        elif inside is not None:
            inside.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("# ")
        elif line.strip():
            before = line
    return blocks


def block(doc: str, heading: str = "", before: str = "") -> str:
    """The first fenced block under `heading` whose preceding line says `before`."""
    found = [text for under, line, text in code_blocks(doc) if heading in under and before in line]
    assert found, f"ARCHITECTURE.md has no block under {heading!r} after a line saying {before!r}"
    return found[0]


def floor_table(doc: str) -> list[tuple[str, int, str]]:
    """(name as written, floor, the entry's whole text) for each entry of the floor table."""
    entries, floor = [], None
    for line in block(doc, "The rooms, by floor").splitlines():
        if not line.strip():
            continue
        match = re.match(r"(?:floor (\d+))? *", line)
        if match.group(1) is not None:
            floor = int(match.group(1))
        if match.end() == NAME_COLUMN:
            name, _, text = line[NAME_COLUMN:].partition(" ")
            entries.append((name, floor, text))
        elif match.end() > NAME_COLUMN and entries:
            name, floor_of_entry, text = entries[-1]
            entries[-1] = (name, floor_of_entry, text + " " + line.strip())
        else:
            raise AssertionError("a floor-table line neither starts an entry nor continues one: "
                                 f"{line!r}")
    return entries


def module_name(written: str) -> str:
    """`trainers/`, `models/adapters.py`, `__init__.py` -> trainers, models.adapters, __init__."""
    return written.rstrip("/").removesuffix(".py").replace("/", ".")


def floors(doc: str) -> dict[str, int]:
    return {module_name(name): floor for name, floor, _ in floor_table(doc)}


def wing(doc: str) -> list[str]:
    """The SCAE wing's rooms, in the map's order (each imports only the ones before it)."""
    return [line.split()[0].removesuffix(".py") for line in wing_block(doc).splitlines()
            if line[:1].strip()]


def wing_block(doc: str) -> str:
    return block(doc, "The rooms, by floor", "The SCAE wing")


def stated(pattern: str, doc: str) -> re.Match:
    """A rule's sentence in the map (flattened to one line); the test fails if the map no longer
    says it."""
    match = re.search(pattern, " ".join(doc.split()))
    assert match, (f"ARCHITECTURE.md no longer says {pattern!r}: update the map and this test "
                   "together")
    return match


# ---- the package read off its source ----

def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        yield ".".join(parts), path


def internal_imports(name, path):
    """The package modules that `name` imports (relative imports), as dotted names."""
    package = (name.split(".") if path.name == "__init__.py" and name != "__init__"
               else name.split(".")[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                yield ".".join([*base, node.module])
            else:  # from . import x
                yield from (".".join([*base, alias.name]) for alias in node.names)


def floor_of(name, table):
    while name not in table and "." in name:
        name = name.rsplit(".", 1)[0]
    return table.get(name)


# ---- the checks, each a list of problems found (empty: the map and the source agree) ----

def import_problems(doc: str) -> list[str]:
    """Imports go down the map's floors; within one package also sideways; in the wing, up its list
    only."""
    table, rooms, problems = floors(doc), wing(doc), []
    for name, path in modules():
        if floor_of(name, table) is None:
            problems.append(f"{name} is on no floor of the map")
            continue
        for target in internal_imports(name, path):
            if target in ("", "__init__") or target == name or floor_of(target, table) is None:
                continue
            if name.startswith("scae.") and target.startswith("scae."):
                room, other = name.split(".")[1], target.split(".")[1]
                if (other not in rooms or room not in rooms
                        or rooms.index(other) >= rooms.index(room)):
                    problems.append(f"scae.{room} imports scae.{other}, not a room above it in the "
                                    "wing's list")
                continue
            same_package = name.split(".")[0] == target.split(".")[0]
            mine, theirs = floor_of(name, table), floor_of(target, table)
            if theirs > mine or (theirs == mine and not same_package):
                problems.append(f"{name} (floor {mine}) imports {target} (floor {theirs})")
    return problems


def path_problems(doc: str) -> list[str]:
    """Every path the map names exists: in the floor table relative to the entry's room or the
    package, in the wing's list in scae/, elsewhere (in backticks) in the package or the
    repository."""
    problems = []
    for name, _, text in floor_table(doc):
        room = PACKAGE / name if name.endswith("/") else PACKAGE
        for path in [name, *PATH.findall(text)]:
            if not ((room / path).exists() or (PACKAGE / path).exists()):
                problems.append(f"the floor table's {name} names {path}, which is not in "
                                f"{room.relative_to(ROOT)}")
    for line in wing_block(doc).splitlines():
        if line[:1].strip() and not (PACKAGE / "scae" / line.split()[0]).exists():
            problems.append(f"the SCAE wing lists {line.split()[0]}, which is not in "
                            "dictionary_learning/scae/")
    elsewhere = re.sub(r"^```.*?^```", "", doc, flags=re.M | re.S)
    diagram = block(doc, "Data flows one way")
    for path in PATH.findall(diagram) + [p for quoted in re.findall(r"`([^`]+)`", elsewhere)
                                         for p in PATH.findall(quoted) if PATH.fullmatch(quoted)]:
        if not ((PACKAGE / path).exists() or (ROOT / path).exists()):
            problems.append(f"ARCHITECTURE.md names {path}, which is neither in the package nor "
                            "the repository")
    return problems


def coverage_problems(doc: str) -> list[str]:
    """Every module and room of the package is an entry of the floor table; every file in a room is
    named in its entry (or is an entry of its own); the wing's list is exactly scae/'s rooms."""
    table = floor_table(doc)
    names = {name for name, _, _ in table}
    problems = []
    for path in sorted(PACKAGE.iterdir()):
        written = path.name + "/" if path.is_dir() else path.name
        if (path.suffix == ".py" or (path / "__init__.py").exists()) and written not in names:
            problems.append(f"{written} is not an entry of the floor table")
    for room in sorted(p for p in PACKAGE.iterdir()
                       if (p / "__init__.py").exists() and p.name != "scae"):
        text = " ".join(text for name, _, text in table if name.startswith(room.name + "/"))
        named = set(PATH.findall(text)) | {name.split("/", 1)[1] for name, _, _ in table
                                           if name.startswith(room.name + "/") and name != room.name
                                           + "/"}
        for path in sorted(room.glob("*.py")):
            if (path.name != "__init__.py" and path.name not in named
                    and f"{room.name}/{path.name}" not in named):
                problems.append(f"{room.name}/{path.name} is not named in {room.name}/'s entry of "
                                "the floor table")
    listed = {f"{name}.py" for name in wing(doc)}
    actual = {path.name for path in (PACKAGE / "scae").glob("*.py")} - {"__init__.py"}
    if listed != actual:
        problems.append(f"the SCAE wing's list {sorted(listed)} is not scae/'s rooms "
                        f"{sorted(actual)}")
    return problems


def folder_problems(doc: str) -> list[str]:
    """Test files live in folders of tests/, and the map's table of test folders is exactly those
    folders."""
    problems = [f"{path.relative_to(ROOT)} is not in a folder of tests/"
                for path in TESTS.glob("test_*.py")]
    folders = {path.parent.relative_to(ROOT).as_posix() + "/" for path in TESTS.rglob("test_*.py")
               if path.parent != TESTS}
    documented = set(re.findall(r"^\| `(tests/[\w/]+/)` \|", doc, flags=re.M))
    problems += [f"{folder} holds tests but is not in the map's table of test folders"
                 for folder in sorted(folders - documented)]
    problems += [f"the map's table of test folders names {folder}, which holds no tests"
                 for folder in sorted(documented - folders)]
    return problems


def line_limit(doc: str) -> int:
    return int(stated(r"every module is under ~(\d+) lines", doc).group(1))


def long_modules(doc: str) -> list[str]:
    limit, problems = line_limit(doc), []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > limit:
            problems.append(f"{path.relative_to(PACKAGE)}: {lines} lines (the map says under "
                            f"~{limit})")
    return problems


# ---- the tests ----

def test_every_path_the_map_names_exists():
    assert path_problems(DOC) == []


def test_every_module_room_and_file_is_on_the_map():
    assert coverage_problems(DOC) == []


def test_tests_mirror_the_rooms_as_the_map_says():
    assert folder_problems(DOC) == []


def test_imports_only_go_down_the_maps_floors():
    assert import_problems(DOC) == []
    assert "suite" in wing(DOC) and floors(DOC)["__main__"] == max(floors(DOC).values())


def test_modules_stay_under_the_maps_line_limit():
    assert long_modules(DOC) == []


def test_nnsight_is_imported_in_one_place():
    door = module_name(stated(r"\*\*nnsight\*\* is imported once \(`([\w/.]+)`\)", DOC).group(1))
    importers = [name for name, path in modules()
                 if re.search(r"^\s*(from|import) nnsight", path.read_text(), re.M)]
    assert importers == [door]


def test_traces_are_opened_at_the_door_only():
    """`.trace(` (an nnsight trace) appears in the door only, and in the map's one named exception:
    the SCAE wing's record pass, which records what the door hides."""
    rule = stated(r"driven through `([\w/.]+)`: `\.trace\(` appears there only, and in one named "
                  r"exception, `([\w/.]+)`'s record pass `(\w+)`", DOC)
    door, exceptions = module_name(rule.group(1)), {module_name(rule.group(2)): rule.group(3)}
    for name, path in modules():
        source = path.read_text()
        if name == door or ".trace(" not in source:
            continue
        allowed = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name == exceptions.get(name):
                allowed |= set(range(node.lineno, node.end_lineno + 1))
        for number, line in enumerate(source.splitlines(), 1):
            assert ".trace(" not in line or number in allowed, f"{name}:{number}: {line.strip()}"


def test_family_knowledge_stays_in_the_models_package():
    home = module_name(stated(r"\*\*Family knowledge\*\* .*? lives in `([\w/]+)` only",
                              DOC).group(1))
    leaks = re.compile(r"n_embd|hidden_size|num_attention_heads|nn\.LayerNorm|kind == "
                       r"\"(layer|rms)\"|\._module\b")
    for name, path in modules():
        if name != home and not name.startswith(home + "."):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                assert not leaks.search(line), f"{path.name}:{number}: {line.strip()}"


def test_the_modules_the_map_calls_self_contained_import_nothing_of_the_package():
    listed = stated(r"((?:`[\w/]+\.py`, )+`[\w/]+\.py` and `[\w/]+\.py`) import nothing of the "
                    r"package", DOC)
    names = [module_name(name) for name in re.findall(r"`([\w/.]+)`", listed.group(1))]
    sources = dict(modules())
    for name in names:
        assert list(internal_imports(name, sources[name])) == [], name
        assert "import dictionary_learning" not in sources[name].read_text(), name


def test_progress_bars_go_through_the_one_module_that_imports_tqdm():
    door = module_name(stated(r"progress bars through `([\w/.]+)` \(the one importer of tqdm\)",
                              DOC).group(1))
    importers = [name for name, path in modules()
                 if re.search(r"^\s*(from|import) tqdm", path.read_text(), re.M)]
    assert importers == [door]


def wrong(doc: str, old: str, new: str) -> str:
    assert old in doc, old
    return doc.replace(old, new, 1)


MISTAKES = {  # a wrong map, and the check that must notice
    "a path renamed": (path_problems, "`models/loading.py`", "`models/load.py`"),
    "a module renamed: its path": (path_problems, "floor 2  tracing.py", "floor 2  tracer.py "),
    "a module renamed: the real one missing": (coverage_problems, "floor 2  tracing.py",
                                               "floor 2  tracer.py "),
    "a room's file left out": (coverage_problems, "heads.py (HeadActivationBuffer)",
                               "HeadActivationBuffer"),
    "a wing room renamed": (coverage_problems, "kernels.py    ", "kernel.py     "),
    "a low floor moved up": (import_problems, "floor 0  files.py   ", "floor 9  files.py   "),
    "a high floor moved down": (import_problems, "floor 4  evaluation/", "floor 1  evaluation/"),
    "a test folder left out": (folder_problems, "| `tests/cache/` | `cache/` |\n", ""),
    "a smaller line limit": (long_modules, "under ~400 lines", "under ~40 lines"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_checks_fail_on_a_wrong_map(mistake):
    check, old, new = MISTAKES[mistake]
    assert check(wrong(DOC, old, new)) != []

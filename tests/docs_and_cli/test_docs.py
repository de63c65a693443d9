"""Every Python and shell block of README.md and docs/*.md runs as written, so the documentation
cannot rot.

Each page runs as one script, its blocks in order, like a notebook: Python blocks share one
namespace, shell blocks run through bash between them, all in a fresh folder that holds links to the
repository's demos/ and bench/ (so `python demos/...` works as it does from a checkout). A block may
be left out only with a comment on the line before its fence saying why, `<!-- not run: needs 4 GPUs
-->`; the test lists those. Running the pages is marked slow (each takes seconds to a minute and a
half). Every fence must name its language: python, bash, or a language that is not code (text, json,
yaml, markdown)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
NOT_CODE = {"text", "json", "yaml", "markdown"}
FENCE = re.compile(r"^```(\S*)\s*$")
SKIP = re.compile(r"^<!-- not run: (.+) -->$")


def blocks(page: Path) -> list[dict]:
    """The fenced blocks of a page: language, first line number, code, and the reason it is not run
    (or None)."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, language = i, match.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        skip = SKIP.match(lines[start - 1]) if start else None
        found.append({"language": language, "line": start + 1,
                      "code": "\n".join(lines[start + 1:end]),
                      "skip": skip.group(1) if skip else None})
        i = end + 1
    return found


def script(page: Path) -> str:
    """The page's runnable blocks as one Python script (shell blocks through `_shell`)."""
    parts = ["import subprocess as _subprocess\nimport sys as _sys\nimport time as _time\n\ndef "
             "_shell(code, line):\n    done = _subprocess.run(['bash', '-euo', 'pipefail', '-c', "
             "code])\n    if done.returncode:\n        raise SystemExit(f'the shell block at line "
             "{line} exited with {done.returncode}')\n\ndef _lap(line, "
             "started=[_time.perf_counter()]):\n    now = _time.perf_counter()\n    print(f'[docs] "
             "block at line {line}: {now - started[0]:.1f} s', file=_sys.stderr, flush=True)\n    "
             "started[0] = now\n"]
    for block in blocks(page):
        kind = RUN.get(block["language"])
        if kind is None or block["skip"]:
            continue
        parts.append(f"# ---- {page.name} line {block['line']}\n")
        if kind == "python":
            parts.append(block["code"] + "\n")
        else:
            parts.append(f"_shell({block['code']!r}, {block['line']})\n")
        parts.append(f"_lap({block['line']})\n")
    return "\n".join(parts)


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def test_every_fence_names_its_language():
    for page in PAGES:
        for block in blocks(page):
            assert block["language"] in set(RUN) | NOT_CODE, \
                (f"{page_id(page)} line {block['line']}: a fence must name python, bash or one "
                 f"of {sorted(NOT_CODE)}")


def test_blocks_left_out_say_why_and_are_few():
    left_out = [(page_id(p), b["line"], b["skip"]) for p in PAGES for b in blocks(p) if b["skip"]]
    runnable = [1 for p in PAGES for b in blocks(p) if b["language"] in RUN and not b["skip"]]
    print(json.dumps({"runnable": len(runnable), "left_out": left_out}, indent=1))
    assert all(reason.strip() for _, _, reason in left_out)
    assert len(left_out) <= 0.15 * (len(left_out) + len(runnable)), left_out


def test_the_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(pip install -e \"\.\[test\]\" && python -m pytest.*)$", readme, re.M)
    assert command, "the README's set-up names the test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in ci and 'pip install --quiet -e ".[test]"' in ci


@pytest.mark.slow
@pytest.mark.parametrize("page", [pytest.param(p, id=page_id(p)) for p in PAGES])
def test_every_block_runs(page, tmp_path):
    if not any(RUN.get(b["language"]) and not b["skip"] for b in blocks(page)):
        pytest.skip("no runnable blocks")
    for name in ("demos", "bench"):
        (tmp_path / name).symlink_to(ROOT / name)
    path = tmp_path / f"{page.stem}_blocks.py"
    path.write_text(script(page))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    print("\n".join(line for line in done.stderr.splitlines() if line.startswith("[docs]")))
    assert done.returncode == 0, (f"{page_id(page)}'s blocks failed (the script's '# ---- line N' "
                                  "comments name each block's line on the "
                                  f"page):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")

"""Count the outcomes of a sweep's cases against whichever `dictionary_learning` is importable:

    python tests/sweep_counts.py [--sweep inputs|surfaces] [--verbose]

`inputs` is tests/reliability/test_sweep.py (bad input to every entry point), `surfaces` its
neighbour test_sweep_surfaces.py (formats, cache, SCAE, numerics, locks, bounds). Each case is
classified as clear (the expected error type with a message naming what was expected and what came,
or the expected warning), correct (a case expecting a correct result got it), confusing (another
error, or a message that does not say it), silent (no error or warning, or a wrong result), hang
(over 60 s) or unsafe (a crafted file ran code, or a file appeared outside the case's folder). Run
it against an older checkout (PYTHONPATH pointing at it) to measure what changed: the issue's before
/ after counts.
"""

import argparse
import collections
import signal
import sys
import tempfile
import warnings
from pathlib import Path

# after PYTHONPATH: an older checkout wins
sys.path.append(str(Path(__file__).resolve().parents[1]))


class Hang(Exception):
    pass


def classify(case, env, tmp):
    name, run, error, message = case
    import re

    def alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    caught = []
    beside = set(p.name for p in tmp.parent.iterdir())
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                run(env, tmp)
            except Hang:
                return "hang", "over 60 s"
            except BaseException as raised:  # noqa: BLE001 (SystemExit included: argparse)
                caught.append(raised)
        signal.alarm(0)
        if (tmp / "pwned").exists():
            return "unsafe", "a crafted file ran code"
        escaped = sorted(set(p.name for p in tmp.parent.iterdir()) - beside)
        if escaped:
            return "unsafe", f"wrote outside its folder: {escaped}"
        if error is None:  # a correct result was expected
            if not caught:
                return "correct", "as expected"
            if isinstance(caught[0], AssertionError):
                return "silent", f"wrong result: {str(caught[0])[:160]}"
            return "confusing", f"{type(caught[0]).__name__}: {str(caught[0])[:160]}"
        if isinstance(error, type) and issubclass(error, Warning):
            if any(issubclass(w.category, error) and re.search(message, str(w.message))
                   for w in seen):
                return "clear", "warned"
            return ("confusing", repr(caught[0])[:160]) if caught else ("silent",
                                                                        "no error, no warning")
        if not caught:
            return "silent", "no error"
        raised = caught[0]
        if isinstance(raised, error) and (error is SystemExit and raised.code == 2
                                          or error is not SystemExit
                                          and re.search(message, str(raised))):
            return "clear", f"{type(raised).__name__}: {str(raised)[:120]}"
        return "confusing", f"{type(raised).__name__}: {str(raised)[:160]}"
    finally:
        signal.alarm(0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", choices=["inputs", "surfaces"], default="inputs")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    import importlib

    import dictionary_learning

    module = {"inputs": "test_sweep", "surfaces": "test_sweep_surfaces"}[args.sweep]
    sweep = importlib.import_module(f"tests.reliability.{module}")
    print(f"dictionary_learning from {Path(dictionary_learning.__file__).parent}")
    counts = collections.Counter()
    with tempfile.TemporaryDirectory() as root:
        env = sweep.make_env(Path(root) / "env")
        for i, case in enumerate(sweep.CASES):
            tmp = Path(root) / "cases" / f"case{i}" / "work"  # a file beside `work` escaped it
            tmp.mkdir(parents=True)
            try:
                verdict, detail = classify(case, env, tmp)
            # the case itself could not run here (a missing name in an older checkout)
            except Exception as error:
                verdict, detail = "confusing", f"{type(error).__name__}: {error}"
            counts[verdict] += 1
            if args.verbose or verdict != "clear":
                print(f"{verdict:>9s}  {case[0]}: {detail}")
    print(f"\n{len(sweep.CASES)} cases: " + ", ".join(f"{counts[k]} {k}" for k in
                                                     ("clear", "correct", "confusing", "silent",
                                                      "hang", "unsafe")))


if __name__ == "__main__":
    main()

"""Count the outcomes of tests/test_sweep.py's cases against whichever `dictionary_learning` is importable:

    python tests/sweep_counts.py [--verbose]

Each case is classified as clear (the expected error type with a message naming what was expected and what came, or
the expected warning), confusing (another error, or a message that does not say it), silent (no error or warning),
hang (over 60 s) or unsafe (a crafted file ran code). Run it against an older checkout (PYTHONPATH pointing at it)
to measure what changed: the issue's before / after counts.
"""

import argparse
import collections
import signal
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an older checkout wins


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
        if isinstance(error, type) and issubclass(error, Warning):
            if any(issubclass(w.category, error) and re.search(message, str(w.message)) for w in seen):
                return "clear", "warned"
            return ("confusing", repr(caught[0])[:160]) if caught else ("silent", "no error, no warning")
        if not caught:
            return "silent", "no error"
        raised = caught[0]
        if isinstance(raised, error) and (error is SystemExit and raised.code == 2
                                          or error is not SystemExit and re.search(message, str(raised))):
            return "clear", f"{type(raised).__name__}: {str(raised)[:120]}"
        return "confusing", f"{type(raised).__name__}: {str(raised)[:160]}"
    finally:
        signal.alarm(0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    import dictionary_learning
    from tests import test_sweep

    print(f"dictionary_learning from {Path(dictionary_learning.__file__).parent}")
    counts = collections.Counter()
    with tempfile.TemporaryDirectory() as root:
        env = test_sweep.make_env(Path(root))
        for i, case in enumerate(test_sweep.CASES):
            tmp = Path(root) / f"case{i}"
            tmp.mkdir()
            try:
                verdict, detail = classify(case, env, tmp)
            except Exception as error:  # the case itself could not run here (a missing name in an older checkout)
                verdict, detail = "confusing", f"{type(error).__name__}: {error}"
            counts[verdict] += 1
            if args.verbose or verdict != "clear":
                print(f"{verdict:>9s}  {case[0]}: {detail}")
    print(f"\n{len(test_sweep.CASES)} cases: " + ", ".join(f"{counts[k]} {k}" for k in
                                                          ("clear", "confusing", "silent", "hang", "unsafe")))


if __name__ == "__main__":
    main()

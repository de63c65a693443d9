"""Run upstream dictionary_learning's own test files against this package, offline.

    python tests/upstream_tests.py /path/to/a/checkout/of/saprmarks/dictionary_learning [-- extra
                                                                                         pytest
        args]

Copies upstream's `tests/unit/test_dictionary.py`, `tests/test_end_to_end.py` and
`tests/test_pytorch_end_to_end.py` into a temporary folder, makes only the offline substitutions
below (model: `tiny-gptneox`, a random GPT-NeoX with pythia-70m-deduped's shapes saved as a local
folder, for MODEL_NAME; text; device; fewer tokens; the numeric comparison against figures for
pythia-70m-deduped on the Pile, reproducible only on an RTX 3090, becomes a check that every
expected key is reported), and runs pytest there with this package on the path. Each substitution
must apply exactly once, so a change upstream is noticed rather than silently skipped. Not collected
by pytest itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OFFLINE_IMPORTS = "from dictionary_learning.data import default_corpus\n"
KEY_CHECK = ("        missing = set(expected_results) - set(eval_results)\n"
             "        assert not missing, missing  # offline: the keys, not pythia's figures\n"
             "        assert all(value == value for value in eval_results.values())  # no NaN\n")

# (pattern, replacement) pairs; patterns are regular expressions that must each match once
END_TO_END = [
    (r'DEVICE = "cuda:0"', 'DEVICE = "cpu"'),
    (r'SAVE_DIR = "\./test_data"', 'SAVE_DIR = os.environ["UPSTREAM_TEST_SAVE_DIR"]'),
    (r"num_tokens = 10_000_000", "num_tokens = 8192 * 25"),
    (r"num_inputs_in_buffer = num_contexts_per_sae_batch \* 20",
     "num_inputs_in_buffer = num_contexts_per_sae_batch * 4"),
    (r"llm_batch_size = 512  # Fits on a 24GB GPU", "llm_batch_size = 64"),
    (r"warmup_steps = 1000  #", "warmup_steps = 5  #"),
    (r"generator = hf_dataset_to_generator\(DATASET_NAME\)\n\n    activation_buffer",
     "generator = default_corpus(repeat=True)\n\n    activation_buffer"),
    (r"generator = hf_dataset_to_generator\(DATASET_NAME\)\n    submodule",
     "generator = default_corpus(repeat=True)\n    submodule"),
    (r"        max_diff = 0\n        max_diff_percent = 0\n(.|\n)*?assert max_diff_percent < "
     r"EVAL_TOLERANCE_PERCENT\n",
     KEY_CHECK),
]
MODEL = [(r'MODEL_NAME = "EleutherAI/pythia-70m-deduped"',
          'MODEL_NAME = os.environ["UPSTREAM_TEST_MODEL"]')]
FILES = {
    "tests/unit/test_dictionary.py": [],
    "tests/test_end_to_end.py": END_TO_END + MODEL,
    "tests/test_pytorch_end_to_end.py": END_TO_END + MODEL,
}


def offline_copy(source: str, substitutions: list[tuple[str, str]], name: str) -> str:
    for pattern, replacement in substitutions:
        source, count = re.subn(pattern, lambda _: replacement, source)
        if count != 1:
            raise SystemExit(f"{name}: the substitution for {pattern!r} applied {count} times, "
                             "expected once")
    if substitutions:
        source = source.replace("import random\n", "import random\n" + OFFLINE_IMPORTS, 1)
    return source


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    upstream = Path(argv[0])
    pytest_args = argv[2:] if len(argv) > 1 and argv[1] == "--" else argv[1:]
    with tempfile.TemporaryDirectory(prefix="upstream_tests_") as work:
        work = Path(work)
        for relative, substitutions in FILES.items():
            path = upstream / relative
            if not path.exists():
                print(f"skipping {relative}: not in {upstream}")
                continue
            target = work / Path(relative).name
            target.write_text(offline_copy(path.read_text(), substitutions, relative))
        (work / "saves").mkdir()
        # pythia-70m-deduped's shapes, random weights, saved as a local model
        model_dir = work / "tiny-gptneox"
        save = ("import sys; from dictionary_learning.models.loading import tiny_hf_model; model, "
                "tokenizer = tiny_hf_model('tiny-gptneox'); model.save_pretrained(sys.argv[1]); "
                "tokenizer.save_pretrained(sys.argv[1])")
        subprocess.check_call([sys.executable, "-c", save, str(model_dir)], cwd=ROOT)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "offline", "UPSTREAM_TEST_SAVE_DIR": str(work / "saves"),
               "UPSTREAM_TEST_MODEL": str(model_dir),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                   str(work), *[str(work / Path(relative).name) for relative in FILES
                     if (upstream / relative).exists()], *pytest_args]
        return subprocess.call(command, cwd=work, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

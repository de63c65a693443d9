"""A two-trainer trainSAE run that training/test_crash.py kills: `python tests/crash_child.py
SAVE_DIR MODE ARG`.

MODE "sleep": each batch takes ARG extra seconds (the parent sends SIGKILL at a random moment); MODE
"rename": the process kills itself with SIGKILL at its ARG-th file rename, after the temporary file
is complete and before it takes its final name (checkpoints, intermediate saves, the final folders'
files alike). The run itself is `run(save_dir)`, which the parent also calls to train the
uninterrupted reference and to resume.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dictionary_learning.dictionary import AutoEncoderTopK, BatchTopKSAE  # noqa: E402
from dictionary_learning.trainers import BatchTopKTrainer, TopKTrainer  # noqa: E402
from dictionary_learning.training import trainSAE  # noqa: E402
from tests.helpers import planted_features, planted_stream  # noqa: E402

STEPS, D, N_TRUE, K = 48, 16, 64, 3


def configs():
    base = dict(activation_dim=D, dict_size=2 * N_TRUE, k=K, lr=2e-3, steps=STEPS, warmup_steps=5,
                seed=0)
    return [dict(trainer=TopKTrainer, dict_class=AutoEncoderTopK, dead_feature_threshold=2_000,
                 **base),
            dict(trainer=BatchTopKTrainer, dict_class=BatchTopKSAE, **{**base, "seed": 1})]


def run(save_dir, resume=False, delay=0.0):
    features = planted_features(N_TRUE, D, seed=0)

    def stream():
        for batch in planted_stream(features, K, 64, STEPS + 8, seed=1):
            if delay:
                time.sleep(delay)
            yield batch

    torch.set_num_threads(1)  # bit-identical results need the same thread count in every run
    return trainSAE(stream(), configs(), STEPS, save_dir=save_dir, checkpoint_steps=5,
                    save_steps=[12, 30], normalize_activations=True, resume=resume, progress=False,
                    keep_checkpoint=True)


if __name__ == "__main__":
    save_dir, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "rename":
        real_replace, renames = os.replace, [0]

        def replace_or_die(source, target):
            renames[0] += 1
            if renames[0] == int(arg):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(source, target)

        os.replace = replace_or_die
    print("started", flush=True)
    run(save_dir, resume=True, delay=float(arg) if mode == "sleep" else 0.0)
    print("finished", flush=True)

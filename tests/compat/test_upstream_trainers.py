"""Every trainer here trains as upstream dictionary_learning's own trainer of the same name (PyPI
0.1.0, run in its own venv: `bash bench/setup_peers.sh dictionary-learning`; skipped when absent):
from the same initial weights, on the same batches, with the same config, 30 steps of upstream's
`update` and of ours end at the same weights (to float32 rounding; the unit-norm decoder helpers add
1e-6 where upstream's ConstrainedAdam divides by the bare norm).

Settings avoid the behaviours this toolkit chose differently (docs/training.md, "Where the trainers
differ from upstream"): warmups shorter than the run, no p reaching 0 under the 'Lp' penalty,
thresholds compared apart.
"""

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from dictionary_learning.trainers import TRAINER_CLASSES

from ..helpers import missing_peer

pytestmark = pytest.mark.peers

UPSTREAM_PYTHON = Path(os.environ.get(
    "DICTIONARY_LEARNING_UPSTREAM_PYTHON",
    (Path.home() / ".cache" / "dictionary_learning" / "peers" / "dictionary-learning" / "bin"
     / "python")))
D, F, STEPS = 16, 64, 30
COMMON = dict(activation_dim=D, dict_size=F, layer=0, lm_name="planted", device="cpu", steps=STEPS,
              seed=0)
SHORT = dict(warmup_steps=3, sparsity_warmup_steps=6)
CASES = {
    "StandardTrainer": dict(lr=1e-2, l1_penalty=0.1, **SHORT),
    "StandardTrainerAprilUpdate": dict(lr=1e-2, l1_penalty=0.1, **SHORT),
    "PAnnealTrainer": dict(lr=1e-2, anneal_start=5, p_end=0.5, n_sparsity_updates=5,
                           sparsity_queue_length=3, **SHORT),
    "GatedSAETrainer": dict(lr=1e-2, l1_penalty=0.1, **SHORT),
    "GatedAnnealTrainer": dict(lr=1e-2, anneal_start=5, p_end=0.5, n_sparsity_updates=5,
                               sparsity_queue_length=3, **SHORT),
    "JumpReluTrainer": dict(lr=1e-2, target_l0=8.0, **SHORT),
    "TopKTrainer": dict(k=4, lr=1e-2, warmup_steps=3, threshold_start_step=5),
    "BatchTopKTrainer": dict(k=4, lr=1e-2, warmup_steps=3, threshold_start_step=5),
    "MatryoshkaBatchTopKTrainer": dict(k=4, lr=1e-2, warmup_steps=3, threshold_start_step=5,
                                       group_fractions=[0.25, 0.25, 0.5],
                                       group_weights=[0.5, 0.3, 0.2]),
}

UPSTREAM = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from dictionary_learning import trainers
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate

    classes = {**vars(trainers), "MatryoshkaBatchTopKTrainer": MatryoshkaBatchTopKTrainer,
               "StandardTrainerAprilUpdate": StandardTrainerAprilUpdate}
    inputs = torch.load(sys.argv[1] + "/inputs.pt")
    results = {}
    for name, config in inputs["cases"].items():
        trainer = classes[name](**config)
        start = {key: value.clone() for key, value in trainer.ae.state_dict().items()}
        for step, x in enumerate(inputs["batches"]):
            trainer.update(step, x)
        results[name] = {"start": start, "end": trainer.ae.state_dict()}
    torch.save(results, sys.argv[1] + "/upstream.pt")
""")


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(F, D, generator=generator)
    out = []
    for _ in range(STEPS):
        active = torch.rand(64, F, generator=generator) < 0.06
        out.append((active * torch.rand(64, F, generator=generator) * 3) @ features + 0.5)
    return out


@pytest.fixture(scope="module")
def upstream_runs(tmp_path_factory):
    if not UPSTREAM_PYTHON.exists():
        missing_peer("dictionary-learning", f"not at {UPSTREAM_PYTHON}")
    folder = tmp_path_factory.mktemp("upstream_trainers")
    torch.save({"cases": {name: {**COMMON, **config} for name, config in CASES.items()},
                "batches": batches()},
               folder / "inputs.pt")
    (folder / "script.py").write_text(UPSTREAM)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": ""}
    result = subprocess.run([str(UPSTREAM_PYTHON), str(folder / "script.py"), str(folder)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(folder / "upstream.pt", weights_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_ends_at_upstreams_weights(upstream_runs, name):
    torch.set_num_threads(1)
    trainer = TRAINER_CLASSES[name](**COMMON, **CASES[name])
    ae = trainer.ae
    start = type(ae).from_saved_state(upstream_runs[name]["start"]).state_dict()
    with torch.no_grad():
        ae.load_state_dict(start)
    for step, x in enumerate(batches()):
        trainer.update(step, x)
    expected = type(ae).from_saved_state(upstream_runs[name]["end"]).state_dict()
    for key, value in ae.state_dict().items():
        # an inference statistic (compared in the trainers' own tests), not a weight
        if key == "threshold":
            continue
        scale = expected[key].abs().max().item()
        difference = (value - expected[key]).abs().max().item()
        assert difference <= 1e-4 * max(scale, 1.0), (f"{name}: {key} differs by {difference:.3g} "
                                                      f"(scale {scale:.3g})")
        assert (not value.is_floating_point()
                or not torch.equal(value, start[key])), f"{name}: {key} never trained"
        print(f"{name} {key}: max difference {difference:.2g} (scale {scale:.2g})")

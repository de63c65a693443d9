"""Save files both ways, against upstream dictionary_learning itself (PyPI 0.1.0, run in its own
venv: build it with `bash bench/setup_peers.sh dictionary-learning`; these tests skip when it is
absent):

- every upstream trainer's dictionary, trained and saved by upstream's own `trainSAE` (normalised
  or not), loads here through `load_dictionary` with upstream's encode / decode / forward /
  features;
- every dictionary this toolkit's `trainSAE` saves loads in upstream's `load_dictionary` with the
  same outputs, and what upstream cannot represent (transcoders) is refused by upstream's loader
  rather than misread.
"""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from dictionary_learning.dictionary import AutoEncoderTopK
from dictionary_learning.trainers import TRAINER_CLASSES
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary, save_dictionary

from ..helpers import missing_peer

pytestmark = pytest.mark.peers

UPSTREAM_PYTHON = Path(os.environ.get(
    "DICTIONARY_LEARNING_UPSTREAM_PYTHON",
    (Path.home() / ".cache" / "dictionary_learning" / "peers" / "dictionary-learning" / "bin"
     / "python")))
D, F, K, STEPS = 16, 64, 4, 30

# shared by both sides: the data stream, the trainer configs (upstream's keys), and the probe inputs
COMMON = textwrap.dedent(f"""
    import torch
    D, F, K, STEPS = {D}, {F}, {K}, {STEPS}

    def stream(n, seed=1):
        generator = torch.Generator().manual_seed(seed)
        features = torch.randn(F, D, generator=generator)
        for _ in range(n):
            active = torch.rand(64, F, generator=generator) < 0.06
            yield (active * torch.rand(64, F, generator=generator) * 3) @ features + 0.5

    def configs(classes):
        common = dict(activation_dim=D, dict_size=F, layer=0, lm_name="planted", device="cpu",
                      steps=STEPS, seed=0)
        short = dict(warmup_steps=2, sparsity_warmup_steps=5)
        return [
            dict(trainer=classes["StandardTrainer"], lr=1e-3, l1_penalty=0.1, resample_steps=None,
                 **short),
            dict(trainer=classes["StandardTrainerAprilUpdate"], lr=1e-3, l1_penalty=0.1, **short),
            dict(trainer=classes["TopKTrainer"], k=K, lr=1e-3, warmup_steps=2,
                 threshold_start_step=5),
            dict(trainer=classes["BatchTopKTrainer"], k=K, lr=1e-3, warmup_steps=2,
                 threshold_start_step=5),
            dict(trainer=classes["BatchTopKTrainer"], k=K, lr=1e-3, warmup_steps=2,
                 threshold_start_step=1000),
            dict(trainer=classes["GatedSAETrainer"], lr=1e-3, l1_penalty=0.1, **short),
            dict(trainer=classes["GatedAnnealTrainer"], lr=1e-3, anneal_start=5, p_end=0.5,
                 n_sparsity_updates=5, sparsity_queue_length=3, **short),
            dict(trainer=classes["PAnnealTrainer"], lr=1e-3, anneal_start=5, p_end=0.5,
                 n_sparsity_updates=5, sparsity_queue_length=3, **short),
            dict(trainer=classes["JumpReluTrainer"], lr=1e-3, target_l0=8.0, **short),
            dict(trainer=classes["MatryoshkaBatchTopKTrainer"], k=K,
                 group_fractions=[0.25, 0.25, 0.5], lr=1e-3, warmup_steps=2,
                 threshold_start_step=5),
        ], common

    def probes():
        generator = torch.Generator().manual_seed(2)
        x = next(stream(1, seed=3))[:32]
        f = (torch.rand(32, F, generator=generator) < 0.1) * torch.rand(32, F, generator=generator)
        return x, f

    @torch.no_grad()
    def outputs(ae):
        x, f = probes()
        return {{"encode": ae.encode(x), "decode": ae.decode(f), "forward": ae(x),
                 "features": ae(x, output_features=True)[1]}}
""")

UPSTREAM_TRAINS = COMMON + textwrap.dedent("""
    import sys
    torch.set_num_threads(1)
    from dictionary_learning import trainers
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
    from dictionary_learning.training import trainSAE
    from dictionary_learning.utils import load_dictionary

    classes = {**vars(trainers), "MatryoshkaBatchTopKTrainer": MatryoshkaBatchTopKTrainer,
               "StandardTrainerAprilUpdate": StandardTrainerAprilUpdate}
    for normalize in (False, True):
        trainer_configs, common = configs(classes)
        trainer_configs = [{**common, **config} for config in trainer_configs]
        save_dir = f"{sys.argv[1]}/normalize_{normalize}"
        trainSAE(stream(200), trainer_configs, STEPS, save_dir=save_dir,
                 normalize_activations=normalize, device="cpu")
        for i in range(len(trainer_configs)):
            ae, _ = load_dictionary(f"{save_dir}/trainer_{i}", "cpu")
            torch.save(outputs(ae), f"{save_dir}/trainer_{i}/upstream_outputs.pt")
""")

UPSTREAM_LOADS = COMMON + textwrap.dedent("""
    import json, sys
    from pathlib import Path
    torch.set_num_threads(1)
    from dictionary_learning.utils import load_dictionary

    refused = {}
    for folder in (sorted(Path(sys.argv[1]).glob("*/trainer_*"))
                   + sorted(Path(sys.argv[1]).glob("transcoder_*"))):
        try:
            ae, _ = load_dictionary(str(folder), "cpu")
            torch.save(outputs(ae), folder / "upstream_outputs.pt")
        except Exception as error:
            refused[str(folder)] = f"{type(error).__name__}: {error}"
    Path(sys.argv[1], "refused.json").write_text(json.dumps(refused))
""")


def upstream(script: str, directory: Path) -> None:
    if not UPSTREAM_PYTHON.exists():
        missing_peer("dictionary-learning", f"not at {UPSTREAM_PYTHON}")
    path = directory / "upstream_script.py"
    path.write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": ""}
    result = subprocess.run([str(UPSTREAM_PYTHON), str(path), str(directory)], capture_output=True,
                            text=True, cwd=directory, env=env, timeout=600)
    if (result.returncode != 0 and "ModuleNotFoundError" in result.stderr
            and "dictionary_learning" in result.stderr):
        missing_peer("dictionary-learning", "there but lacks dictionary_learning")
    assert result.returncode == 0, result.stderr[-3000:]


def ours():
    namespace = {}
    exec(COMMON, namespace)
    return namespace


def assert_outputs_match(expected: dict, actual: dict, where: str) -> None:
    for key, reference in expected.items():
        tolerance = 1e-5 + 1e-4 * reference.abs().max().item()
        difference = (actual[key] - reference).abs().max().item()
        assert difference <= tolerance, (f"{where}: {key} differs by {difference:.3g} "
                                         f"(tolerance {tolerance:.3g})")


def test_upstream_saves_load_here_with_the_same_outputs(tmp_path):
    upstream(UPSTREAM_TRAINS, tmp_path)
    namespace = ours()
    folders = sorted(tmp_path.glob("normalize_*/trainer_*"))
    assert len(folders) == 2 * len(namespace["configs"](TRAINER_CLASSES)[0])
    for folder in folders:
        ae, config = load_dictionary(folder)
        expected = torch.load(folder / "upstream_outputs.pt", weights_only=True)
        assert_outputs_match(expected, namespace["outputs"](ae),
                             f"{folder.parent.name}/{config['trainer']['dict_class']}")


def test_our_saves_load_in_upstream_with_the_same_outputs(tmp_path):
    namespace = ours()
    trainer_configs, common = namespace["configs"](TRAINER_CLASSES)
    for normalize in (False, True):
        trainSAE(namespace["stream"](200), [{**common, **config} for config in trainer_configs],
                 STEPS, save_dir=tmp_path / f"normalize_{normalize}",
                 normalize_activations=normalize, progress=False)
    # transcoders: wider output, a skip connection, and the square one whose weights look like an
    # SAE's
    for name, kwargs in {"wide": dict(output_dim=2 * D), "skip": dict(skip=True),
                         "square": dict(transcoder=True)}.items():
        save_dictionary(AutoEncoderTopK(D, F, K, **kwargs), tmp_path / f"transcoder_{name}")
    upstream(UPSTREAM_LOADS, tmp_path)
    refused = json.loads((tmp_path / "refused.json").read_text())
    for folder in sorted(tmp_path.glob("normalize_*/trainer_*")):
        assert str(folder) not in refused, refused.get(str(folder))
        ae, config = load_dictionary(folder)
        expected = torch.load(folder / "upstream_outputs.pt", weights_only=True)
        assert_outputs_match(expected, namespace["outputs"](ae),
                             f"{folder.parent.name}/{config['trainer']['dict_class']}")
    for name in ("wide", "skip", "square"):
        assert str(tmp_path / f"transcoder_{name}") in refused, (f"upstream loaded the {name} "
                                                                 "transcoder")
        assert not (tmp_path / f"transcoder_{name}" / "upstream_outputs.pt").exists()

"""Every dictionary the toolkit trains saves where it reads (and writes), whatever fed it: the
quickstart (from collected activations or from a cache), a buffer, an end-to-end run and an SCAE
suite's modules. So every format's export names the hook points with no flag, and the import of that
export restores the model name (one `load_model` takes offline), the layer, the site names and the
hook paths. The truth is the model's own module tree: the hook paths are checked against
`hook(model, layer, site)`."""

import json

import pytest

from dictionary_learning import ActivationBuffer, hook, load_model
from dictionary_learning.formats import export, import_dictionary
from dictionary_learning.reports import collect, quickstart
from dictionary_learning.scae import train_suite
from dictionary_learning.trainers import BatchTopKTrainer, TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary

from ..helpers import random_texts

QUICK = dict(model="tiny-llama", tokens=400, steps=3, batch=64, d_sae=64, k=4, eval_texts=8,
             eval_tokens=128, ctx_len=32, loss_batches=1, n_features=1, dashboard_features=0,
             progress=False)


def round_trip(folder, tmp_path, model, layer, sites, formats=("saelens", "sparsify")):
    """Export `folder` to each format with no hook option, check the hook the export names, import
    it back and check the imported config names the model, layer, sites and paths."""
    points = [hook(model, layer, site) for site in sites]
    _, saved = load_dictionary(folder)
    for to in formats:
        out = export(folder, tmp_path / to, to=to)
        if to == "saelens":
            metadata = json.loads((out / "cfg.json").read_text())["metadata"]
            path = points[0].path if points[0].io == "output" else None
            # an MLP's input is named as its norm's output (tested in test_formats.py)
            if path is not None:
                assert metadata["hook_name"] == path
            if len(points) == 2:
                assert metadata["hook_name_out"] == points[1].path
        [back] = import_dictionary(out, tmp_path / f"{to}_back")
        _, config = load_dictionary(back)
        trainer = config["trainer"]
        assert trainer["lm_name"] == saved["trainer"]["lm_name"], to
        assert trainer["layer"] == layer, to
        hooks = config["buffer"]["hooks"]
        assert [(h["path"], h["io"], h["name"]) for h in hooks] == [(p.path, p.io, p.name)
                                                                    for p in points], to
        load_model(trainer["lm_name"])  # loadable offline under the name the import gives


@pytest.fixture(scope="module")
def quickstart_sae(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    quickstart(**QUICK, out=out)
    return out / "sae" / "trainer_0"


def test_the_quickstarts_own_sae(quickstart_sae, tmp_path, tiny_llama):
    round_trip(quickstart_sae, tmp_path, tiny_llama, 2, ["resid"])


def test_the_quickstart_from_a_cache(tmp_path, tiny_llama):
    collect(model="tiny-llama", layers="1", sites="mlp_out", tokens=600, ctx_len=32,
            out=tmp_path / "cache")
    quickstart(**{**QUICK, "layer": 1, "site": "mlp_out"}, cache=tmp_path / "cache",
               out=tmp_path / "q")
    round_trip(tmp_path / "q" / "sae" / "trainer_0", tmp_path, tiny_llama, 1, ["mlp_out"])


@pytest.mark.parametrize("trainer,formats",
                         [(TopKTrainer, ("sparsify",)), (BatchTopKTrainer, ("saelens",))])
def test_a_transcoder_trained_on_a_buffer(tmp_path, tiny_llama, trainer, formats):
    points = (hook(tiny_llama, 1, "mlp_in"), hook(tiny_llama, 1, "mlp_out"))
    buffer = ActivationBuffer(iter(random_texts(40, seed=5)), tiny_llama, points, io="in_to_out",
                              n_ctxs=8, ctx_len=32, refresh_batch_size=4, out_batch_size=32)
    config = dict(trainer=trainer, activation_dim=64, dict_size=128, k=4, transcoder=True, steps=4,
                  warmup_steps=1, threshold_start_step=1, layer=1, lm_name="tiny-llama")
    if trainer is TopKTrainer:
        config.pop("threshold_start_step")
    trainSAE(buffer, [config], 4, save_dir=tmp_path / "runs", progress=False)
    round_trip(tmp_path / "runs" / "trainer_0", tmp_path, tiny_llama, 1, ["mlp_in", "mlp_out"],
               formats)


def test_an_end_to_end_sae(tmp_path, tiny_llama):
    texts = random_texts(12, seed=9)
    batches = (texts[i:i + 4] for i in range(0, 12, 4))
    config = dict(trainer=TopKTrainer, activation_dim=64, dict_size=128, k=4, steps=3,
                  warmup_steps=1, lm_name="tiny-llama", layer=2)
    trainSAE(batches, [config], 3, save_dir=tmp_path / "runs", progress=False,
             end_to_end={"model": tiny_llama, "hooks": (hook(tiny_llama, 2, "resid"),),
                         "ctx_len": 24})
    round_trip(tmp_path / "runs" / "trainer_0", tmp_path, tiny_llama, 2, ["resid"])


def test_the_modules_of_an_scae_suite(tmp_path, tiny_llama):
    texts = random_texts(200, seed=4)
    train_suite(tiny_llama, 2, 128, 4, iter(texts), 3, model_name="tiny-llama",
                save_dir=tmp_path / "scae", progress=False, normalization_batches=1, n_ctxs=8,
                ctx_len=32, out_batch_size=64, refresh_batch_size=4)
    suite = tmp_path / "scae" / "suite"
    round_trip(suite / "attn_1", tmp_path / "attn", tiny_llama, 1, ["attn_out"],
               ("sparsify", "saelens"))
    round_trip(suite / "mlp_1", tmp_path / "mlp", tiny_llama, 1, ["mlp_in", "mlp_out"],
               ("sparsify",))

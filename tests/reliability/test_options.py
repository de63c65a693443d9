"""Every entry point that takes its options as a config dataclass (`config=` or the fields as
keywords) answers a misspelt option, a config of the wrong class and, where the config has required
fields, a missing one with a TypeError naming the entry point and what it accepts, before any work
(no model is loaded, no folder written)."""

import pytest
import torch

from dictionary_learning.cache import write_cache
from dictionary_learning.dashboard import build_dashboard, dashboard, feature_statistics
from dictionary_learning.reports import collect, quickstart
from dictionary_learning.scae import SCAETrainer, train_scae_suite, train_suite
from dictionary_learning.trainers import TopKConfig, TopKTrainer
from dictionary_learning.training import RunOptions, train_dictionaries, trainSAE

BATCHES = [torch.randn(8, 4)]
CONFIGS = [dict(trainer=TopKTrainer, activation_dim=4, dict_size=8, k=2, steps=1)]

# (entry point, a call with the option given; the option is `nonsense=1` unless said)
CALLS = {
    "train_dictionaries": lambda **kw: train_dictionaries(BATCHES, CONFIGS, 1, **kw),
    "trainSAE": lambda **kw: trainSAE(BATCHES, CONFIGS, 1, **kw),
    "quickstart": lambda **kw: quickstart(**kw),
    "collect": lambda **kw: collect(**kw),
    "dashboard": lambda **kw: dashboard("no/such/folder", **kw),
    "build_dashboard": lambda **kw: build_dashboard(None, None, None, [], "out", **kw),
    "feature_statistics": lambda **kw: feature_statistics(None, None, None, [], [0], **kw),
    "write_cache": lambda **kw: write_cache(None, [], None, "out", 10, **kw),
    "train_suite": lambda **kw: train_suite(None, 1, 8, 2, [], 1, **kw),
    "train_scae_suite": lambda **kw: train_scae_suite(None, None, [], None, 1, **kw),
    "SCAETrainer": lambda **kw: SCAETrainer(None, None, None, 1, **kw),
    "TopKTrainer": lambda **kw: TopKTrainer(steps=1, activation_dim=4, dict_size=8, k=2, **kw),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_misspelt_option_is_named_with_what_is_accepted(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    owner = "train_dictionaries" if name == "trainSAE" else name  # (trainSAE maps onto it)
    with pytest.raises(TypeError, match=rf"{owner} got unexpected keyword argument\(s\) "
                                        r"\['nonsense'\]; accepted"):
        CALLS[name](nonsense=1)
    assert list(tmp_path.iterdir()) == []  # nothing was written


@pytest.mark.parametrize("name", ["train_dictionaries", "quickstart", "collect", "dashboard",
                                  "build_dashboard", "feature_statistics", "write_cache",
                                  "SCAETrainer"])
def test_a_config_of_another_class_is_refused(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key = "run_options" if name == "train_dictionaries" else "config"
    with pytest.raises(TypeError, match=f"{name}.*must be a"):
        CALLS[name](**{key: RunOptions() if name != "train_dictionaries" else object()})


def test_missing_required_fields_are_named():
    with pytest.raises(TypeError, match="TopKTrainer is missing 1 required argument.*'k'"):
        TopKTrainer(steps=1, activation_dim=4, dict_size=8)
    with pytest.raises(TypeError, match="SCAETrainer is missing 1 required argument.*'steps'"):
        SCAETrainer(None, None, None)
    # a config and fields beside it: the fields replace the config's
    trainer = TopKTrainer(config=TopKConfig(steps=5, activation_dim=4, dict_size=8, k=2), k=3)
    assert trainer.cfg.k == 3 and trainer.cfg.steps == 5


def test_renamed_options_name_their_new_names(tmp_path, monkeypatch):
    """This package's own functions spell a dictionary's width d_sae (dict_size stays upstream's
    name in trainer configs and saved files): the old keyword fails naming the new one, before any
    work; the command line takes --dict-size or --d-sae."""
    from dictionary_learning.__main__ import parser
    from dictionary_learning.dashboard import parse_features
    from dictionary_learning.reports import QuickstartConfig
    from dictionary_learning.scae import SCAESuite

    monkeypatch.chdir(tmp_path)
    calls = [lambda: quickstart(dict_size=64),
             lambda: train_suite(None, 1, dict_size=8, k=2, data=[], steps=1),
             lambda: SCAESuite.random(None, dict_size=8, k=2),
             lambda: parse_features("all", dict_size=8)]
    for call in calls:
        with pytest.raises(TypeError, match="dict_size was renamed d_sae"):
            call()
    assert list(tmp_path.iterdir()) == []
    assert QuickstartConfig(d_sae=64, k=4).d_sae == 64
    assert parse_features("all", d_sae=3) == [0, 1, 2]
    for flag in ("--dict-size", "--d-sae"):
        assert parser().parse_args(["train", flag, "64"]).d_sae == 64

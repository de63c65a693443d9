"""BufferSettings and takes_settings: upstream's flat call forms (positional or by keyword) become
one checked settings object, and the constructor shows the flat signature."""

import inspect

import pytest
import torch

from dictionary_learning.buffer.settings import UPSTREAM_SIZES, BufferSettings, takes_settings


class Recorder:
    """A constructor written against BufferSettings, called as upstream's are."""

    @takes_settings((*UPSTREAM_SIZES, "flag"), ("dtype", "seed"))
    def __init__(self, data, model, *, settings: BufferSettings, flag: bool = False, **options):
        (self.data, self.model, self.settings, self.flag,
         self.options) = data, model, settings, flag, options


def test_the_flat_signature():
    parameters = list(inspect.signature(Recorder).parameters.values())
    assert [p.name for p in parameters] == ["data", "model", *UPSTREAM_SIZES, "flag", "dtype",
                                            "seed", "options"]
    assert [p.default for p in parameters[2:8]] == [30000, 128, 512, 8192, "cpu", False]
    assert {p.kind for p in parameters[:8]} == {inspect.Parameter.POSITIONAL_OR_KEYWORD}
    assert {p.kind for p in parameters[8:10]} == {inspect.Parameter.KEYWORD_ONLY}


def test_positional_and_keyword_calls_give_the_same_settings():
    by_position = Recorder("texts", "model", 10, 4, 2, 8, "meta", True, dtype=torch.float16, seed=3)
    by_keyword = Recorder(data="texts", model="model", n_ctxs=10, ctx_len=4, refresh_batch_size=2,
                          out_batch_size=8, device="meta", flag=True, dtype=torch.float16, seed=3)
    expected = BufferSettings(10, 4, 2, 8, "meta", dtype=torch.float16, seed=3)
    for made in (by_position, by_keyword):
        assert (made.data, made.model, made.flag, made.options) == ("texts", "model", True, {})
        assert made.settings == expected


def test_defaults_and_options():
    made = Recorder("texts", "model", remove_bos=True, other=1)  # settings through **options too
    assert made.settings == BufferSettings(remove_bos=True)
    assert made.options == {"other": 1}


def test_bad_calls_are_refused():
    with pytest.raises(TypeError):
        Recorder("texts", "model", 1, 2, 3, 4, "cpu", False, "one too many")
    with pytest.raises(TypeError):
        Recorder("texts", "model", 1, n_ctxs=2)
    with pytest.raises(ValueError, match="n_ctxs must be a positive int, got 0"):
        Recorder("texts", "model", n_ctxs=0)
    with pytest.raises(TypeError, match="dtype"):
        Recorder("texts", "model", dtype=torch.int64)


def test_upstream_float_sizes_become_ints():
    settings = BufferSettings(n_ctxs=3e4, out_batch_size=8192.0)
    assert (settings.n_ctxs, settings.out_batch_size) == (30000, 8192)
    assert type(settings.n_ctxs) is int
    with pytest.raises(ValueError, match="ctx_len"):
        BufferSettings(ctx_len=12.5)

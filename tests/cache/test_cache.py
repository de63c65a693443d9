"""The disk activation cache: write_cache's shards against plain PyTorch forward hooks and the
ActivationBuffer, resumable writing (interrupted, or extended) equal to an uninterrupted write, and
the ActivationCache reader's shuffling (seeded, every row once per epoch), resume, rank split,
memory bound and errors, trainSAE on it, and the `collect` command writing one."""

import gc
import json
import math
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from dictionary_learning import ActivationBuffer, hook
from dictionary_learning.__main__ import main
from dictionary_learning.cache import ActivationCache, cache_from_tensors, write_cache
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE

from ..helpers import assert_same_rows, hook_reference, random_texts

CTX = 24


def shard_rows(path):
    """Every hook point's rows of a cache, shards concatenated in order, read with plain
    safetensors."""
    manifest = json.loads((path / "manifest.json").read_text())
    shards = [load_file(path / shard["file"]) for shard in manifest["shards"]]
    return [torch.cat([shard[f"hook_{i}"] for shard in shards])
            for i in range(len(manifest["hooks"]))]


def write(model, texts, submodule, out, **options):
    options = {"n_tokens": 10**6, "ctx_len": CTX, "batch_texts": 5, "shard_tokens": 64,
               "progress": False, **options}
    return write_cache(model, texts, submodule, out, **options)


# -------------------------------------------------------------------------------------- write_cache
def test_shards_hold_forward_hook_rows_in_text_order(tiny_model, tmp_path):
    """Many hook points (one an in_to_out pair) from one pass: each hook point's shards,
    concatenated, are the forward-hook rows text by text; the reader's rows stay aligned across hook
    points."""
    texts = random_texts(14, seed=1)
    points = {"resid_1": hook(tiny_model, 1, "resid"), "attn_0": hook(tiny_model, 0, "attn_out"),
              "mlp_1": (hook(tiny_model, 1, "mlp_in"), hook(tiny_model, 1, "mlp_out"))}
    write(tiny_model, texts, points, tmp_path / "c", shard_tokens=37)
    order = [points["resid_1"], points["attn_0"], *points["mlp_1"]]
    reference = hook_reference(tiny_model, texts, order, CTX)
    for got, expected in zip(shard_rows(tmp_path / "c"), reference):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    n = reference[0].shape[0]
    assert (manifest["n_tokens"] == n and manifest["position"] == len(texts)
            and manifest["exhausted"])
    assert [s["tokens"] for s in manifest["shards"]] == [37] * (n // 37) + [n % 37] * bool(n % 37)
    assert manifest["entries"] == {"resid_1": [0], "attn_0": [1], "mlp_1": [2, 3]}
    assert [h["name"] for h in manifest["hooks"]] == [str(p) for p in order]

    cache = ActivationCache(tmp_path / "c", n)  # one batch: every row, shuffled
    assert cache.entry_names == ["resid_1", "attn_0", "mlp_1"] and cache.n_tokens == n
    batch = next(cache)
    assert isinstance(batch["mlp_1"], tuple)
    d = reference[0].shape[1]
    assert cache.d_submodule == {"resid_1": d, "attn_0": d, "mlp_1": (d, d)}
    flat = torch.cat([batch["resid_1"], batch["attn_0"], *batch["mlp_1"]], -1)
    assert_same_rows(flat, torch.cat(reference, -1))


def test_single_point_and_pair_equal_the_buffer(tiny_llama, tmp_path):
    """A single hook point (remove_bos) and an in_to_out module path: the cache serves the buffer's
    rows."""
    texts = random_texts(12, seed=2)
    for name, submodule, io in (("one", hook(tiny_llama, 2, "resid"), "out"),
                                ("pair", "model.layers.0.mlp", "in_to_out")):
        write(tiny_llama, texts, submodule, tmp_path / name, io=io, remove_bos=True)
        buffer = ActivationBuffer(texts, tiny_llama, submodule, io=io, n_ctxs=100, ctx_len=CTX,
                                  refresh_batch_size=5, out_batch_size=500, remove_bos=True)
        expected = buffer.take(10**6)
        cache = ActivationCache(tmp_path / name, 50, epochs=None)
        got = next(ActivationCache(tmp_path / name, cache.n_tokens))
        if io == "in_to_out":
            assert isinstance(got, tuple) and cache.d_submodule == (64, 64)
            got, expected = torch.cat(got, -1), torch.cat(expected, -1)
        assert_same_rows(got, expected)
        assert cache.config["io"] == io and cache.config["remove_bos"] is True
        json.dumps(cache.config)


def test_shard_sizes_only_cut_the_same_rows(tiny_llama, tmp_path):
    texts = random_texts(10, seed=3)
    point = hook(tiny_llama, 1, "mlp_out")
    rows = []
    for shard_tokens in (7, 64, 10**6):
        write(tiny_llama, texts, point, tmp_path / str(shard_tokens), shard_tokens=shard_tokens)
        manifest = json.loads((tmp_path / str(shard_tokens) / "manifest.json").read_text())
        assert len(manifest["shards"]) == -(-manifest["n_tokens"] // shard_tokens)
        rows.append(shard_rows(tmp_path / str(shard_tokens))[0])
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])


def same_cache(a, b):
    manifest_a, manifest_b = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for manifest in (manifest_a, manifest_b):  # what the filter dropped in the latest write call
        assert manifest.pop("filtered")["tokens_seen"] > 0
    assert manifest_a == manifest_b
    for shard in manifest_a["shards"]:
        x, y = load_file(a / shard["file"]), load_file(b / shard["file"])
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


@pytest.mark.slow
def test_interrupted_and_extended_writes_resume_to_the_uninterrupted_cache(tiny_llama, tmp_path):
    texts = random_texts(30, seed=5)
    texts[7] = "   "  # an empty item is consumed and skipped
    points = {"r0": hook(tiny_llama, 0, "resid"),
              "mlp": (hook(tiny_llama, 2, "mlp_in"), hook(tiny_llama, 2, "mlp_out"))}
    write(tiny_llama, texts, points, tmp_path / "straight", n_tokens=600)

    def crashing(n):  # a data source that dies after n items
        for i, text in enumerate(texts):
            if i == n:
                raise RuntimeError("source died")
            yield text

    for n in (3, 17, 24):  # before the first shard, mid-way, and again
        with pytest.raises(RuntimeError, match="source died"):
            write(tiny_llama, crashing(n), points, tmp_path / "crashed", n_tokens=600)
    shutil.copy(tmp_path / "crashed" / "shard_00000.safetensors",
                tmp_path / "crashed" / "shard_00040.safetensors")
    # the stray shard is removed
    write(tiny_llama, texts, points, tmp_path / "crashed", n_tokens=600)
    same_cache(tmp_path / "straight", tmp_path / "crashed")

    for n_tokens in (100, 130, 257, 600):  # a partial last shard is reopened and extended
        write(tiny_llama, iter(texts), points, tmp_path / "extended", n_tokens=n_tokens)
        assert (json.loads((tmp_path / "extended" / "manifest.json").read_text())["n_tokens"]
                == n_tokens)
    same_cache(tmp_path / "straight", tmp_path / "extended")


def test_mismatched_settings_and_foreign_folders_are_refused(tiny_llama, tmp_path):
    texts = random_texts(6, seed=6)
    point = hook(tiny_llama, 1, "resid")
    write(tiny_llama, texts, point, tmp_path / "c")
    for change, message in (({"ctx_len": 16}, "ctx_len: 24 in the cache, 16 now"),
                            ({"dtype": torch.bfloat16},
                             "dtype: 'float32' in the cache, 'bfloat16' now"),
                            ({"submodule": hook(tiny_llama, 2, "resid")}, "hooks: "),
                            ({"remove_bos": True}, "remove_bos: False"),
                            ({"shard_tokens": 10}, "shard_tokens")):
        kwargs = {"submodule": point, **change}
        with pytest.raises(ValueError, match=message):
            write(tiny_llama, texts, kwargs.pop("submodule"), tmp_path / "c", **kwargs)
    with pytest.raises(ValueError, match="has read 6 items of its data, but this data has only 2"):
        write(tiny_llama, texts[:2], point, tmp_path / "c")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an activation cache"):
        write(tiny_llama, texts, point, tmp_path / "other")


# ---------------------------------------------------------------------------------- ActivationCache
N, SHARD = 1000, 70  # 15 shards, the last of 20 rows


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """A cache whose row i is [i, i + 0.5] (as x) and [-i] (as y): every row names itself."""
    path = tmp_path_factory.mktemp("numbered") / "cache"
    ids = torch.arange(N, dtype=torch.float32)
    cache_from_tensors(path, {"x": torch.stack([ids, ids + 0.5], 1),
                              "pair": (ids[:, None], -ids[:, None])},
                       shard_tokens=SHARD)
    return path


def ids_of(batch):
    return batch["x"][:, 0].long().tolist()


def test_shuffling_is_seeded_and_serves_every_row_once_per_epoch(numbered):
    batches = list(ActivationCache(numbered, 64, seed=0, epochs=2, window_shards=3))
    assert len(batches) == 2 * (N // 64) and len(ActivationCache(numbered, 64)) == N // 64
    for epoch in (batches[: N // 64], batches[N // 64 :]):
        ids = [i for batch in epoch for i in ids_of(batch)]
        # the last partial batch (40 rows) is dropped
        assert len(ids) == len(set(ids)) == N // 64 * 64
    for batch in batches:  # rows stay aligned across entries and within pairs
        torch.testing.assert_close(batch["x"][:, 1], batch["x"][:, 0] + 0.5)
        torch.testing.assert_close(batch["pair"][1], -batch["pair"][0])
        torch.testing.assert_close(batch["pair"][0][:, 0], batch["x"][:, 0])
    assert ids_of(batches[0]) != ids_of(batches[N // 64])  # epochs differ
    assert len({i // SHARD for i in ids_of(batches[0])}) > 1  # a batch mixes shards
    again = list(ActivationCache(numbered, 64, seed=0, epochs=2, window_shards=3))
    assert all(ids_of(a) == ids_of(b) for a, b in zip(batches, again))
    other = list(ActivationCache(numbered, 64, seed=1, epochs=2, window_shards=3))
    assert ids_of(other[0]) != ids_of(batches[0])


def test_start_batch_and_next_resume_the_same_stream(numbered):
    full = [ids_of(b) for b in ActivationCache(numbered, 48, seed=3, epochs=2, window_shards=2)]
    for start in (1, 5, 20, 21, 29, len(full) - 1):
        resumed = [ids_of(b) for b in ActivationCache(numbered, 48, seed=3, epochs=2,
                                                      window_shards=2, start_batch=start)]
        assert resumed == full[start:]
    skipping = ActivationCache(numbered, 48, seed=3, epochs=2, window_shards=2)
    for _ in range(9):
        next(skipping)
    assert [ids_of(b) for b in skipping] == full[9:]
    endless = ActivationCache(numbered, 48, seed=3, epochs=None, window_shards=2,
                              start_batch=len(full) - 1)
    # a third epoch follows
    assert ids_of(next(endless)) == full[-1] and len(ids_of(next(endless))) == 48


def test_ranks_split_each_global_batch(numbered):
    single = list(ActivationCache(numbered, 60, seed=2, epochs=1, window_shards=2))
    ranks = [list(ActivationCache(numbered, 20, seed=2, rank=r, world_size=3, window_shards=2))
             for r in range(3)]
    assert all(len(r) == len(single) for r in ranks)
    for i, batch in enumerate(single):
        assert sum((ids_of(rank[i]) for rank in ranks), []) == ids_of(batch)


class Recording(ActivationCache):
    def _read_window(self, epoch, w, window, carry):
        self.read = getattr(self, "read", []) + list(window)
        return super()._read_window(epoch, w, window, carry)


def test_memory_holds_one_window_and_skipped_windows_are_never_read(numbered):
    cache = Recording(numbered, 64, window_shards=3)
    list(cache)
    assert sorted(cache.read) == list(range(N // SHARD + 1))  # each shard read once in the epoch
    assert 3 * SHARD <= cache.peak_rows <= 3 * SHARD + 64 < N
    late = Recording(numbered, 64, window_shards=3, start_batch=12)
    list(late)
    assert len(late.read) <= 6  # only the windows holding rows of batches 12 to 14
    # a reader dropped mid-epoch frees its window at once: no reference cycle waits for the
    # collector
    gc.disable()
    try:
        cache = ActivationCache(numbered, 64)
        next(cache)
        dropped = weakref.ref(cache)
        del cache
        assert dropped() is None
    finally:
        gc.enable()


def test_entries_selection_device_and_dtype(numbered):
    cache = ActivationCache(numbered, 10, entries="pair", dtype=torch.float64)
    x, y = next(cache)
    assert x.dtype == torch.float64 and cache.entry_names is None and cache.d_submodule == (1, 1)
    cache = ActivationCache(numbered, 10, entries=["x"])
    assert (list(next(cache)) == ["x"] and cache.entry_names == ["x"]
            and cache.d_submodule == {"x": 2})
    with pytest.raises(ValueError, match=r"entries \['nope'\] are not in this cache; its entries: "
                                         r"\['x', 'pair'\]"):
        ActivationCache(numbered, 10, entries=["nope"])


def test_missing_and_corrupt_files_give_clear_errors(numbered, tmp_path):
    with pytest.raises(ValueError, match="is not an activation cache: it has no manifest.json"):
        ActivationCache(tmp_path, 8)
    with pytest.raises(ValueError,
                       match=r"batch_size \* world_size = 1200 exceeds the cache's 1000 tokens"):
        ActivationCache(numbered, 600, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size - 1=1\], got 2"):
        ActivationCache(numbered, 6, rank=2, world_size=2)

    def broken(name, damage):
        path = tmp_path / name
        shutil.copytree(numbered, path)
        damage(path)
        return path

    cases = [
        (lambda p: (p / "manifest.json").write_text("{ not json"), "not a valid JSON file"),
        (lambda p: (p / "manifest.json").write_text(json.dumps({"format": "x"})),
         "is not an activation cache manifest"),
        (lambda p: (p / "shard_00003.safetensors").unlink(), "shard_00003.safetensors' listed in "
                                                              "the cache's manifest.json is "
                                                              "missing"),
        (lambda p: (p / "shard_00002.safetensors").write_bytes(b"\x10\x00"),
         "not a readable safetensors file"),
        (lambda p: save_file({f"hook_{i}": torch.zeros(69, w) for i, w in enumerate((2, 1, 1))},
                             p / "shard_00001.safetensors"), r"shape \[69, 2\].*expects \[70, 2\]"),
    ]
    for i, (damage, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            ActivationCache(broken(f"b{i}", damage), 8)
    with pytest.raises(TypeError, match="must be a floating"):
        cache_from_tensors(tmp_path / "ints", torch.zeros(3, 2, dtype=torch.long))


# ----------------------------------------------------------------------------------------- training
def test_trainsae_trains_from_the_cache_and_resumes_exactly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    codes = (torch.rand(2000, 48, generator=generator)
             * (torch.rand(2000, 48, generator=generator) < 0.1))
    cache_from_tensors(tmp_path / "cache", codes @ torch.randn(48, 16, generator=generator),
                       shard_tokens=300)
    config = {"trainer": TopKTrainer, "activation_dim": 16, "dict_size": 64, "k": 4, "steps": 30,
              "warmup_steps": 0, "seed": 0, "device": "cpu"}

    def reader():
        return ActivationCache(tmp_path / "cache", 128, seed=0, epochs=None)

    straight = trainSAE(reader(), [config], 30, save_dir=tmp_path / "straight", progress=False)
    saved = json.loads((tmp_path / "straight" / "trainer_0" / "config.json").read_text())
    assert (saved["buffer"]["cache"] == str(tmp_path / "cache")
            and saved["buffer"]["d_submodule"] == 16)

    def dying(batches, n):
        for i, batch in enumerate(batches):
            if i == n:
                raise RuntimeError("killed")
            yield batch

    with pytest.raises(RuntimeError, match="killed"):
        trainSAE(dying(reader(), 22), [config], 30, save_dir=tmp_path / "resumed",
                 checkpoint_steps=10, progress=False)
    resumed = trainSAE(reader(), [config], 30, save_dir=tmp_path / "resumed", resume=True,
                       progress=False)
    for (name, x), y in zip(straight[0].ae.state_dict().items(),
                            resumed[0].ae.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------- command line
def test_collect_command_writes_and_continues_a_cache(tmp_path):
    common = ["collect", "--model", "tiny-llama", "--dtype", "float32", "--ctx-len", "24",
              "--batch", "8", "--layers", "0,2", "--sites", "resid,mlp_out", "--shard-tokens",
              "100", "--out", str(tmp_path / "c")]
    first = main([*common, "--tokens", "250"])
    assert first["cache_tokens"] == 250 and first["shards"] == 3
    assert set(first["statistics"]) == {"layers.0.resid", "layers.0.mlp_out", "layers.2.resid",
                                        "layers.2.mlp_out"}
    more = main([*common, "--tokens", "420"])  # the same command, more tokens: continues
    assert more["cache_tokens"] == 420 and more["tokens_added"] == 170 and more["shards"] == 5
    cache = ActivationCache(tmp_path / "c", 64, entries="layers.2.mlp_out")
    assert next(cache).shape == (64, 64) and cache.config["model"] == "tiny-llama"
    single = main(["collect", "--model", "tiny-llama", "--dtype", "float32", "--ctx-len", "24",
                   "--layer", "1", "--tokens", "60", "--out", str(tmp_path / "one.safetensors")])
    assert (single["tokens"] == 60
            and load_file(tmp_path / "one.safetensors")["activations"].shape == (60, 64))
    several = main(["collect", "--model", "tiny-llama", "--dtype", "float32", "--ctx-len", "24",
                    "--layers", "0,1", "--tokens", "40", "--out",
                    str(tmp_path / "two.safetensors")])
    saved = load_file(tmp_path / "two.safetensors")
    assert set(saved) == set(several["statistics"]) == {"layers.0.resid", "layers.1.resid"}
    assert saved["layers.1.resid"].shape == (40, 64)
    with pytest.raises(ValueError, match="give layer=1 or layers='0,1', not both"):
        main(["collect", "--model", "tiny-llama", "--layer", "1", "--layers", "0,1"])


def test_quickstart_trains_from_a_cache(tmp_path):
    """`train --cache DIR` trains on the cache's activations (nothing collected) and holds out the
    texts after those the cache read; a cache of another model or hook point is refused before
    training."""
    main(["collect", "--model", "tiny-llama", "--dtype", "float32", "--ctx-len", "32", "--layer",
          "1", "--tokens", "600", "--batch", "8", "--out", str(tmp_path / "c")])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    common = ["train", "--model", "tiny-llama", "--dtype", "float32", "--layer", "1", "--steps",
              "3", "--batch", "64", "--dict-size", "64", "--k", "4", "--eval-texts", "8",
              "--eval-tokens", "128", "--ctx-len", "32", "--loss-batches", "1", "--n-features", "1"]
    metrics = main([*common, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "q")])
    assert metrics["training_tokens_collected"] == manifest["n_tokens"] == 600
    assert metrics["ce_clean"] > 0 and math.isfinite(metrics["ce_patched"])
    config = json.loads((tmp_path / "q" / "sae" / "trainer_0" / "config.json").read_text())
    assert config["buffer"]["cache"] == str(tmp_path / "c")
    with pytest.raises(ValueError, match="not layers.2.resid"):
        main([*common[:5], "--layer", "2", *common[7:], "--cache", str(tmp_path / "c"), "--out",
              str(tmp_path / "r")])
    with pytest.raises(ValueError, match="holds activations of 'tiny-llama', not of 'tiny-gpt2'"):
        main(["train", "--model", "tiny-gpt2", "--cache", str(tmp_path / "c"), "--out",
              str(tmp_path / "r")])
    # evaluation runs on contexts as long as the cache's: its ctx_len unless told, another one
    # refused
    without = [arg for i, arg in enumerate(common)
               if arg != "--ctx-len" and common[i - 1] != "--ctx-len"]
    metrics = main([*without, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "s")])
    assert metrics["ctx_len"] == 32
    with pytest.raises(ValueError, match="collected with ctx_len=32, not ctx_len=64"):
        main([*without, "--ctx-len", "64", "--cache", str(tmp_path / "c"), "--out",
              str(tmp_path / "r")])

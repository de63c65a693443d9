"""The second bad-input sweep, on the surfaces added after the first (test_sweep.py): format export
and import, the activation cache, the dashboard, SCAE suites, end-to-end and distributed training,
loading, numerics, resource limits and the command line, against each class of failure issue 24
names:

- containment: no name read from a file (hook paths, module names, shard and layer files, hub
  subfolders) becomes a path outside the folder it belongs to; configs are written by serializers,
  so a name cannot inject keys;
- divergence: a loss, gradient or weight that stops being finite stops the run, naming the step and
  trainer, and leaves the last good save and checkpoint as they were; evaluation refuses non-finite
  input and reports degenerate metrics as undefined;
- concurrent writers: a second writer of a cache, dictionary, suite or run folder is refused at
  once;
- mismatched state: suites, caches and connections record what they came from and refuse another;
  peer configs are checked against their weights; ranks compare their configs;
- bounds: sizes that cannot fit in memory are refused before any work; nothing can hang;
- no work lost at the end: a pipeline's figures are written before its optional extras.

Each case is (name, run(env, tmp), expected, message): the expected error type and a regex its
message matches, a warning type, or None for a correct result (the run asserts it). `python
tests/sweep_counts.py --sweep surfaces` counts them as clear / correct / confusing / silent / hang /
unsafe."""

import json
import math
import multiprocessing
import os
import shutil
import time
import types
import warnings

import pytest
import torch

import dictionary_learning.files as files
from dictionary_learning import ActivationBuffer, ActivationCache, hook, load_model, write_cache
from dictionary_learning.__main__ import main
from dictionary_learning.dashboard import dashboard
from dictionary_learning.data import passages
from dictionary_learning.dictionary import (
    AutoEncoder,
    AutoEncoderTopK,
    BatchTopKSAE,
    JumpReluAutoEncoder,
    MatryoshkaBatchTopKSAE,
)
from dictionary_learning.evaluation import evaluate, feature_density, reconstruction_metrics
from dictionary_learning.formats import export, import_dictionary, load
from dictionary_learning.scae import (
    SCAESuite,
    all_connections,
    random_connections,
    select_connections,
    train_scae_suite,
)
from dictionary_learning.trainers import (
    BatchTopKTrainer,
    JumpReluTrainer,
    MatryoshkaBatchTopKTrainer,
    StandardTrainer,
    TopKTrainer,
)
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary, save_dictionary

from ..helpers import CTX, RunsCode, make_suite, planted_features, planted_stream, random_texts

# (older checkouts, measured by sweep_counts, lack it)
FolderInUse = getattr(files, "FolderInUse", OSError)


def _tolerant(function, reference=None):
    """`function`, dropping keyword arguments that it (or `reference`, where it forwards them) does
    not take, so the cases run unchanged against older checkouts, which lack `progress=` or
    `keep_checkpoint=` (sweep_counts measures those): a missing option is not what a case tests."""
    import functools
    import inspect

    parameters = inspect.signature(reference or function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return function

    @functools.wraps(function)
    def call(*args, **kwargs):
        return function(*args, **{k: v for k, v in kwargs.items() if k in parameters})

    return call


def _tolerant_imports():
    import dictionary_learning.training.train as train_module

    global trainSAE, evaluate, write_cache, select_connections, _dashboard
    trainSAE = _tolerant(trainSAE, getattr(train_module, "train_dictionaries", None))
    evaluate, write_cache = _tolerant(evaluate), _tolerant(write_cache)
    select_connections, _dashboard = _tolerant(select_connections), _tolerant(dashboard)
D, DICT, K = 64, 128, 4
TEXTS = random_texts(16, seed=5)
_tolerant_imports()
HOOK = {"path": "model.layers.1", "io": "output", "name": "layers.1.resid"}
MLP = [{"path": "model.layers.1.mlp", "io": "input", "name": "layers.1.mlp_in"},
       {"path": "model.layers.1.mlp", "io": "output", "name": "layers.1.mlp_out"}]


def sae_config(hooks=(HOOK,), lm_name="tiny-llama", layer=1):
    return {"trainer": {"lm_name": lm_name, "layer": layer}, "buffer": {"hooks": list(hooks)}}


def make_env(root):
    """Saved artifacts the cases corrupt copies of: a TopK SAE, a BatchTopK transcoder, their
    exports in the three formats, a small activation cache and an SCAE suite with connections."""
    model = load_model("tiny-llama")
    eager = load_model("tiny-llama", attn_implementation="eager")
    torch.manual_seed(0)
    save_dictionary(AutoEncoderTopK(D, DICT, K), root / "sae", sae_config())
    transcoder = BatchTopKSAE(D, DICT, K, transcoder=True)
    transcoder.threshold.fill_(0.1)
    save_dictionary(transcoder, root / "tc", sae_config(MLP))
    export(root / "sae", root / "saelens", to="saelens")
    export(root / "sae", root / "sparsify", to="sparsify")
    layers = []
    for layer in range(4):
        path = f"model.layers.{layer}.mlp"
        folder = save_dictionary(JumpReluAutoEncoder(D, DICT, transcoder=True),
                                 root / "set" / f"tc{layer}",
                                 sae_config([{"path": path, "io": "input"},
                                             {"path": path, "io": "output"}], layer=layer))
        layers.append(folder)
    export(layers, root / "ct", to="circuit-tracer")
    write_cache(model, iter(TEXTS * 4), {"resid_1": hook(model, 1, "resid")}, root / "cache",
                n_tokens=512, ctx_len=32, shard_tokens=128, model_name="tiny-llama", progress=False)
    suite = make_suite(eager, n_layer=2)
    suite.model_name = "tiny-llama"
    suite.connections = all_connections(suite, eager)
    suite.save(root / "suite")
    return types.SimpleNamespace(model=model, eager=eager, root=root, suite=suite)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("surfaces"))


# --------------------------------------------------------------------------------------------------
# helpers the cases share


def copy(env, tmp, name):
    shutil.copytree(env.root / name, tmp / name)
    return tmp / name


def edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def set_hooks(hooks):
    return lambda c: {**c, "buffer": {**c.get("buffer", {}), "hooks": hooks}}


def crafted_sae(env, tmp, hooks):
    folder = copy(env, tmp, "sae")
    edit_json(folder / "config.json", set_hooks(hooks))
    return folder


def nothing_outside(tmp, before):
    """The files under tmp's parent that were not there before (an escaped write lands beside
    tmp)."""
    return sorted(set(p.name for p in tmp.parent.iterdir()) - before)


def escaped_export(env, tmp, hooks, to="sparsify", **options):
    """Export a crafted SAE to `to`; assert no file appeared outside the target folder (re-raising
    the error)."""
    folder = crafted_sae(env, tmp, hooks)
    before = set(p.name for p in tmp.parent.iterdir())
    try:
        export(folder, tmp / "out", to=to, **options)
    finally:
        assert nothing_outside(tmp, before) == [], "an export wrote outside its folder"


def edit_safetensors(path, edit):
    from safetensors.torch import load_file, save_file

    save_file(edit(dict(load_file(str(path)))), str(path))


def stream(n=8, batch=32, width=D, scale=1.0):
    for x in planted_stream(planted_features(DICT, width, seed=0), 2, batch, n, seed=1):
        yield x * scale


def topk(steps=6, **overrides):
    return {**dict(trainer=TopKTrainer, activation_dim=D, dict_size=DICT, k=K, lr=1e-3, steps=steps,
                   seed=0, warmup_steps=1), **overrides}


def train(data=None, configs=None, steps=6, **kwargs):
    return trainSAE(stream() if data is None else data, configs or [topk(steps)], steps,
                    progress=False, **kwargs)


def diverging_run_keeps_the_good_save(tmp, bad_data=None, bad_configs=None, **kwargs):
    """A good run saves; a diverging run in the same folder must fail, leave the good dictionary as
    it was, and never write a checkpoint holding NaN / inf."""
    train(save_dir=tmp / "run", keep_checkpoint=True)
    good = (tmp / "run" / "trainer_0" / "ae.pt").read_bytes()
    try:
        train(data=bad_data, configs=bad_configs, save_dir=tmp / "run", keep_checkpoint=True,
              **kwargs)
    finally:
        assert ((tmp / "run" / "trainer_0" / "ae.pt").read_bytes()
                == good), "a diverging run replaced the good save"
        state = torch.load(tmp / "run" / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["trainers"][0]["ae"].values()
                   if t.is_floating_point()), "a diverging run wrote a non-finite checkpoint"


def cli(*args):
    return main(list(args))


def truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def held_by_another_process(path, what, run):
    """`run()` while a child process holds the writer lock of `path`."""
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    child = multiprocessing.get_context("fork").Process(target=_hold,
                                                        args=(str(path), what, ready, release))
    child.start()
    try:
        assert ready.wait(30), "the child never took the lock"
        return run()
    finally:
        release.set()
        child.join(30)


def _hold(path, what, ready, release):
    """A writer in the middle of writing `path` (where a checkout has no locks, measured by
    sweep_counts: a writer that holds nothing, as its real writers did)."""
    import contextlib

    lock = getattr(files, "writer_lock", None)
    with lock(path, what) if lock is not None else contextlib.nullcontext():
        ready.set()
        release.wait(60)


def killed_holder_releases(tmp):
    """A writer killed while holding a folder's lock blocks no one afterwards."""
    ready = multiprocessing.Event()
    child = multiprocessing.get_context("fork").Process(target=_hold,
                                                        args=(str(tmp / "d"), "folder", ready,
                                                                              multiprocessing.Event()))
    child.start()
    assert ready.wait(30)
    child.kill()
    child.join(30)
    save_dictionary(AutoEncoderTopK(D, DICT, K), tmp / "d")
    assert (tmp / "d" / "ae.pt").exists()


def suite_for_other_model(env, tmp):
    """The saved suite (of tiny-llama, seed 0), used with a tiny-llama of other weights (seed 1):
    same widths."""
    other = load_model("tiny-llama", attn_implementation="eager", seed=1)
    return select_connections(SCAESuite.load(env.root / "suite"), other, TEXTS[:4], 4, ctx_len=CTX,
                              progress=False)


def other_parameters(env, tmp):
    """A suite whose connections' stored virtual weights were computed from other parameters."""
    suite = SCAESuite.load(copy(env, tmp, "suite"))
    with torch.no_grad():
        suite["mlp_1"].encoder.weight.mul_(2)
    suite.save(tmp / "suite")
    SCAESuite.load(tmp / "suite")


def with_connection_weights(env, tmp, value):
    folder = copy(env, tmp, "suite")
    edit_safetensors(folder / "connections.safetensors",
                     lambda t: {k: (v.fill_(value) if k == "mlp_1.weights" else v)
                                for k, v in t.items()})
    SCAESuite.load(folder)


def batchtopk_suite(env):
    modules = dict(env.suite.dictionaries.items())
    modules["mlp_1"] = BatchTopKSAE(D, 96, 8, transcoder=True)
    return SCAESuite(modules)


def timed(seconds, function, *args, **kwargs):
    """Run `function`; fail (as a hang would) if it takes longer than `seconds`."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    elapsed = time.perf_counter() - started
    assert elapsed < seconds, f"took {elapsed:.1f} s (bound {seconds} s)"
    return result


def random_connections_near_half(env):
    """C just under half the source features: every draw distinct and in range, at once."""
    n_sources = env.suite.n_sources("mlp_1")
    connections = timed(10, random_connections, env.suite, n_sources // 2 - 1, seed=0,
                        model=env.eager)
    connections.validate(env.suite)
    assert connections.indices["mlp_1"].shape[1] == n_sources // 2 - 1


def lone_rank_times_out(tmp):
    """A launch whose second rank never comes: init_distributed gives up after its timeout with a
    clear error."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from dictionary_learning.training import init_distributed\n"
            "init_distributed(timeout=3)\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    if done.returncode == 0:
        return None
    raise RuntimeError(done.stderr.strip().splitlines()[-1])


def ranks_with_other_configs(tmp):
    """Data-parallel ranks whose trainer configs differ: refused at the start, before any step."""
    from dictionary_learning.training.distributed import check_same_on_every_rank

    # what two ranks gather: this rank's hash first, the other rank's (of another config) next
    class FakeSync:
        def gather_objects(self, value):
            return [value, "a hash of other configs"]

    check_same_on_every_rank(FakeSync(), {"lr": 1e-3, "k": 4}, "trainer configs")


def quickstart(tmp, **overrides):
    from dictionary_learning.reports import quickstart as run

    options = dict(model="tiny-llama", tokens=400, steps=3, batch=64, d_sae=64, k=4,
                   eval_texts=8, eval_tokens=128, ctx_len=32, loss_batches=1, n_features=1,
                   dashboard_features=0, out=tmp / "q", progress=False)
    return _tolerant(run)(**{**options, **overrides})


def metrics_kept_when_top_contexts_fail(tmp, monkeypatch_target=("dictionary_learning.reports."
                                                                 "top_activating_contexts")):
    """An extra that fails (top contexts here) is skipped with a note; the figures are written."""
    import dictionary_learning.reports as reports

    original = reports.top_activating_contexts

    def failing(*args, **kwargs):
        raise RuntimeError("top contexts failed (simulated)")

    reports.top_activating_contexts = failing
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            metrics = quickstart(tmp)
    finally:
        reports.top_activating_contexts = original
    assert (tmp / "q" / "metrics.json").exists() and "fvu" in metrics
    assert any("top contexts" in str(w.message) for w in seen), [str(w.message) for w in seen]


def no_feature_in_the_window(tmp):
    # every feature fires on every token: none below 5% density
    metrics = quickstart(tmp, d_sae=64, k=64)
    assert (tmp / "q" / "metrics.json").exists() and "fvu" in metrics
    assert "no feature" in (tmp / "q" / "top_contexts.txt").read_text()


def imported_saelens_dashboard(env, tmp):
    """A SAELens folder imported here names its hook, so the dashboard opens it with no --layer /
    --site."""
    [imported] = import_dictionary(env.root / "saelens", tmp / "imported")
    meta = _dashboard(imported, out=tmp / "dash", features=4, tokens=64, batch_texts=4,
                      progress=False,
                                dtype="float32")
    assert meta["hook"] == "layers.1.resid"


def memory_bound(what):
    return f"{what}.*(GB|TB|PB).*memory"


def degenerate_fvu():
    """Zero-variance targets with a large error: FVU is undefined (NaN, with a warning), never 'all
    explained'."""
    x = torch.ones(16, D)
    sae = AutoEncoderTopK(D, DICT, K)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        metrics = reconstruction_metrics(sae, x)
    assert math.isnan(metrics["fvu"]) and math.isnan(metrics["frac_variance_explained"]), metrics
    assert any("variance" in str(w.message) for w in seen)


def export_then_yaml_name(env, tmp, name):
    """A model name holding YAML syntax is written as one value: it reads back unchanged and adds no
    key."""
    import yaml

    layers = [env.root / "set" / f"tc{i}" for i in range(4)]
    export(layers, tmp / "ct", to="circuit-tracer", model_name=name)
    config = yaml.safe_load((tmp / "ct" / "config.yaml").read_text())
    assert (config["model_name"] == name and "activation" not in config
            and "evil" not in config), config


def saelens_name_round_trip(env, tmp, name):
    from dictionary_learning.formats import load_weights

    export(env.root / "sae", tmp / "sl", to="saelens", hook_name=name)
    assert load_weights(tmp / "sl").hooks[0]["path"] == name


CASES = [
    # ------------------------------------------------------------------------ containment (unsafe)
    ("contain: export sparsify of an absolute hook path", lambda e, t: escaped_export(
        e, t, [{"path": str(t.parent / "escaped"), "io": "output"}]), ValueError,
     "hookpoint|outside|leads out"),
    ("contain: export sparsify of a ../.. hook path", lambda e, t: escaped_export(
        e, t, [{"path": "../../escaped", "io": "output"}]), ValueError,
     "hookpoint|outside|leads out"),
    ("contain: export sparsify of a hook path with a slash", lambda e, t: escaped_export(
        e, t, [{"path": "model/../../escaped", "io": "output"}]), ValueError,
     "hookpoint|outside|leads out"),
    ("contain: --hookpoint ../x", lambda e, t: escaped_export(e, t, [HOOK], hookpoint="../escaped"),
     ValueError, "hookpoint"),
    ("contain: --hookpoint absolute",
     lambda e, t: escaped_export(e, t, [HOOK], hookpoint=str(t.parent / "x")), ValueError,
     "hookpoint"),
    ("contain: --hookpoint empty", lambda e, t: escaped_export(e, t, [HOOK], hookpoint=" "),
     ValueError, "hookpoint"),
    ("contain: sparsify import --hookpoint ../x",
     lambda e, t: load(e.root / "sparsify", hookpoint="../sae"), ValueError, "hookpoint"),
    ("contain: imported SAELens hook ../.. then sparsify export", lambda e, t: (
        edit_json(copy(e, t, "saelens") / "cfg.json",
                  lambda c: {**c, "metadata": {**c["metadata"], "hook_name": "../../escaped"}}),
        import_dictionary(t / "saelens", t / "imported"),
        escaped_export(e, t, load_dictionary(t / "imported")[1]["buffer"]["hooks"])), ValueError,
     "hookpoint|outside|leads out|hook"),
    ("contain: suite.json names a module ../x", lambda e, t: (
        edit_json(copy(e, t, "suite") / "suite.json",
                  lambda c: {**c, "modules": ["../sae", "mlp_0"]}),
        SCAESuite.load(t / "suite")), ValueError, "module names|leads out"),
    ("contain: suite.json names an absolute module", lambda e, t: (
        edit_json(copy(e, t, "suite") / "suite.json",
                  lambda c: {**c, "modules": [str(e.root / "sae")]}),
        SCAESuite.load(t / "suite")), ValueError, "module names|leads out"),
    ("contain: cache manifest shard ../", lambda e, t: (
        edit_json(copy(e, t, "cache") / "manifest.json",
                  lambda c: {**c,
                             "shards": [{**c["shards"][0], "file": "../sae/model.safetensors"}]}),
        ActivationCache(t / "cache", 16)), ValueError, "leads out|shard"),
    ("contain: cache manifest shard absolute", lambda e, t: (
        edit_json(copy(e, t, "cache") / "manifest.json",
                  lambda c: {**c, "shards": [{**c["shards"][0],
                                              "file": str(e.root / "cache"
                                                          / "shard_00000.safetensors")}]}),
        ActivationCache(t / "cache", 16)), ValueError, "leads out|shard"),
    ("contain: cache shard that is a link out", lambda e, t: (
        copy(e, t, "cache").joinpath("shard_00000.safetensors").unlink(),
        (t / "cache" / "shard_00000.safetensors").symlink_to(e.root / "sae" / "model.safetensors"),
        ActivationCache(t / "cache", 16)), ValueError, "outside|leads out"),
    ("contain: circuit-tracer transcoders list absolute", lambda e, t: (
        copy(e, t, "ct").joinpath("config.yaml").write_text(
            (t / "ct" / "config.yaml").read_text() + "transcoders:\n- "
                                                     f"{e.root / 'ct' / 'layer_0.safetensors'}\n"),
        load(t / "ct")), ValueError, "leads out|outside"),
    ("contain: circuit-tracer transcoders list ../", lambda e, t: (
        copy(e, t, "ct").joinpath("config.yaml").write_text(
            (t / "ct" / "config.yaml").read_text() + "transcoders:\n- ../ct/layer_0.safetensors\n"),
        load(t / "ct")), ValueError, "leads out|outside"),
    ("contain: hub subfolder ../..",
     lambda e, t: __import__("dictionary_learning.utils", fromlist=["x"])
     .download_from_hub("someone/repo", "../../etc"), ValueError, "subfolder"),
    ("contain: hub subfolder absolute",
     lambda e, t: __import__("dictionary_learning.utils", fromlist=["x"])
     .download_from_hub("someone/repo", "/etc"), ValueError, "subfolder"),
    ("contain: push_to_hub path_in_repo ../",
     lambda e, t: __import__("dictionary_learning.utils", fromlist=["x"])
     .push_to_hub(e.root / "sae", "someone/repo", path_in_repo="../x"), ValueError, "path_in_repo"),
    ("contain: a module name with a slash",
     lambda e, t: SCAESuite({"attn_0/../x": AutoEncoderTopK(D, 96, 8)}), ValueError,
     "module names"),
    ("contain: import into a file's place", lambda e, t: (t.joinpath("afile").write_text("x"),
                                                         import_dictionary(e.root / "saelens",
                                                                           t / "afile")),
     NotADirectoryError, "afile"),
    # ---------------------------------------------------------------------- injection through names
    ("inject: model name with a newline and a key (circuit-tracer)",
     lambda e, t: export_then_yaml_name(
        e, t, "tiny\nactivation: topk\nevil: 1"), None, None),
    ("inject: model name with YAML flow syntax",
     lambda e, t: export_then_yaml_name(e, t, "{evil: 1}"), None, None),
    ("inject: model name starting with a quote", lambda e, t: export_then_yaml_name(e, t, "'tiny"),
     None, None),
    ("inject: SAELens hook name with a newline", lambda e, t: saelens_name_round_trip(
        e, t, "model.layers.1\n\"x\": 1"), None, None),
    ("inject: sparsify model name with a quote", lambda e, t: (
        edit_json(copy(e, t, "sae") / "config.json",
                  lambda c: {**c, "trainer": {**c["trainer"], "lm_name": 'tiny"llama'}}),
        export(t / "sae", t / "sp", to="sparsify", hookpoint="layers.1"),
        json.loads((t / "sp" / "layers.1" / "cfg.json").read_text())), None, None),
    # ------------------------------------------------------------------------ divergence (silent)
    ("diverge: lr inf", lambda e, t: train(configs=[topk(lr=math.inf)]), ValueError,
     "lr must be a finite number"),
    ("diverge: lr nan", lambda e, t: train(configs=[topk(lr=math.nan)]), ValueError,
     "lr must be a finite number"),
    ("diverge: lr -inf", lambda e, t: train(configs=[topk(lr=-math.inf)]), ValueError,
     "lr must be a finite number"),
    ("diverge: auxk_alpha nan", lambda e, t: train(configs=[topk(auxk_alpha=math.nan)]), ValueError,
     "auxk_alpha must be a finite"),
    ("diverge: auxk_alpha inf", lambda e, t: train(configs=[topk(auxk_alpha=math.inf)]), ValueError,
     "auxk_alpha must be a finite"),
    ("diverge: threshold_beta nan", lambda e, t: train(configs=[topk(threshold_beta=math.nan)]),
     ValueError, "threshold_beta must be a finite"),
    ("diverge: StandardTrainer l1_penalty inf", lambda e, t: train(configs=[dict(
        trainer=StandardTrainer, activation_dim=D, dict_size=DICT, lr=1e-3, l1_penalty=math.inf,
        steps=6,
        warmup_steps=1, seed=0)]), ValueError, "l1_penalty must be a finite"),
    ("diverge: JumpReLU target_l0 nan", lambda e, t: train(configs=[dict(
        trainer=JumpReluTrainer, activation_dim=D, dict_size=DICT, target_l0=math.nan, steps=6,
        seed=0)]),
     ValueError, "target_l0 must be a finite"),
    ("diverge: Matryoshka group_weights with nan", lambda e, t: train(configs=[dict(
        trainer=MatryoshkaBatchTopKTrainer, activation_dim=D, dict_size=DICT, k=K, steps=6, seed=0,
        group_fractions=[0.5, 0.5], group_weights=[1.0, math.nan])]), ValueError, "group_weights"),
    ("diverge: huge finite activations", lambda e, t: diverging_run_keeps_the_good_save(
        t, bad_data=stream(scale=1e25)), FloatingPointError, r"step \d+.*trainer 0"),
    ("diverge: float16 autocast overflow", lambda e, t: diverging_run_keeps_the_good_save(
        t, bad_data=stream(scale=3e4), autocast_dtype=torch.float16), FloatingPointError,
     r"step \d+.*trainer 0"),
    ("diverge: a NaN lr slipped into the optimizer", lambda e, t: diverging_run_keeps_the_good_save(
        t, bad_configs=[topk(lr=1e30)]), FloatingPointError, r"step \d+"),
    ("diverge: the message names the likely causes", lambda e, t: train(data=stream(scale=1e25)),
     FloatingPointError, "lr.*activations|activations.*lr"),
    ("diverge: BatchTopK on huge activations", lambda e, t: train(
        data=stream(scale=1e25),
        configs=[dict(trainer=BatchTopKTrainer, activation_dim=D, dict_size=DICT, k=K, steps=6,
                      seed=0, warmup_steps=1)]),
     FloatingPointError, r"step \d+"),
    ("diverge: nothing saved in a fresh folder", lambda e, t: (
        pytest.raises(FloatingPointError, train, data=stream(scale=1e25), save_dir=t / "run"),
        [p.name for p in (t / "run").rglob("*")
         if p.name.endswith((".pt", ".safetensors"))] == [] or
        (_ for _ in ()).throw(AssertionError("a diverged run saved files"))), None, None),
    ("diverge: resume after a divergence continues from the last good checkpoint", lambda e, t: (
        pytest.raises(FloatingPointError, train,
                      data=(b * (1e25 if i == 4 else 1) for i, b in enumerate(stream())),
                      save_dir=t / "run", checkpoint_steps=2),
        train(save_dir=t / "run", resume=True, checkpoint_steps=2),
        (t / "run" / "trainer_0" / "ae.pt").exists() or
        (_ for _ in ()).throw(AssertionError("no save"))),
     None, None),
    ("diverge: end-to-end kl_weight inf", lambda e, t: trainSAE(
        iter([TEXTS[:4]]), [topk(1)], 1, progress=False,
        end_to_end={"model": e.model, "hooks": (hook(e.model, 1, "resid"),),
                    "kl_weight": math.inf}), ValueError,
     "kl_weight must be a finite"),
    ("diverge: end-to-end local_weight nan", lambda e, t: trainSAE(
        iter([TEXTS[:4]]), [topk(1)], 1, progress=False,
        end_to_end={"model": e.model, "hooks": (hook(e.model, 1, "resid"),),
                    "local_weight": math.nan}),
     ValueError, "local_weight must be a finite"),
    ("diverge: SCAE fine-tune lr inf", lambda e, t: train_scae_suite(
        make_suite(e.eager, 2), e.eager, TEXTS, all_connections(e.suite, e.eager), 2, lr=math.inf,
        ctx_len=CTX,
        progress=False), ValueError, "lr must be a finite number"),
    ("diverge: SCAE fine-tune mse_weight nan", lambda e, t: train_scae_suite(
        make_suite(e.eager, 2), e.eager, TEXTS, all_connections(e.suite, e.eager), 2,
        mse_weight=math.nan,
        ctx_len=CTX, progress=False), ValueError, "mse_weight must be a finite"),
    ("diverge: initial_weights holding NaN", lambda e, t: (
        edit_safetensors(copy(e, t, "sae") / "model.safetensors",
                         lambda s: {k: v.fill_(math.nan) if v.is_floating_point() else v
                                    for k, v in s.items()}),
        (t / "sae" / "ae.pt").unlink(),
        train(configs=[topk(initial_weights=str(t / "sae"))])), ValueError, "NaN / inf"),
    # --------------------------------------------------------------- evaluation on degenerate input
    ("eval: NaN activations",
     lambda e, t: evaluate(AutoEncoderTopK(D, DICT, K), iter([torch.full((8, D), math.nan)]),
                                                    progress=False), ValueError, "NaN / inf"),
    ("eval: inf activations", lambda e, t: evaluate(AutoEncoderTopK(D, DICT, K),
                                                    iter([torch.full((8, D), math.inf)]),
                                                    progress=False),
     ValueError, "NaN / inf"),
    ("eval: zero-variance data has no FVU", lambda e, t: degenerate_fvu(), None, None),
    ("eval: reconstruction_metrics on NaN", lambda e, t: reconstruction_metrics(
        AutoEncoderTopK(D, DICT, K), torch.full((4, D), math.nan)), ValueError, "NaN / inf"),
    ("eval: feature_density on NaN", lambda e, t: feature_density(AutoEncoderTopK(D, DICT, K),
                                                                  [torch.full((4, D), math.nan)]),
     ValueError, "NaN / inf"),
    ("eval: evaluate of a dictionary with NaN weights", lambda e, t: evaluate(
        AutoEncoderTopK(D, DICT, K).requires_grad_(False).apply(
            lambda m: [p.fill_(math.nan) for p in m.parameters(recurse=False)]),
        iter([torch.randn(8, D)]), progress=False), ValueError, "NaN / inf"),
    ("eval: loss_recovered where zero-ablation changes nothing", lambda e, t: _flat_recovered(e),
     None, None),
    # ------------------------------------------------------------------ concurrent writers (silent)
    ("lock: two caches written to one folder", lambda e, t: held_by_another_process(
        t / "cache", "activation cache",
        lambda: write_cache(e.model, iter(TEXTS), hook(e.model, 1, "resid"), t / "cache",
                            n_tokens=64, ctx_len=32, progress=False)),
     FolderInUse, "being written"),
    ("lock: collect into a folder being written", lambda e, t: held_by_another_process(
        t / "acts", "activation cache",
        lambda: cli("collect", "--model", "tiny-llama", "--tokens", "64", "--ctx-len", "32",
                    "--out", str(t / "acts"))),
     FolderInUse, "being written"),
    ("lock: a dictionary saved while another writer saves it", lambda e, t: held_by_another_process(
        t / "d", "folder", lambda: save_dictionary(AutoEncoderTopK(D, DICT, K), t / "d")),
     FolderInUse, "being written"),
    ("lock: a suite saved while another writer saves it", lambda e, t: held_by_another_process(
        t / "s", "folder", lambda: e.suite.save(t / "s")), FolderInUse, "being written"),
    ("lock: two training runs in one save_dir", lambda e, t: held_by_another_process(
        t / "run", "training run folder", lambda: train(save_dir=t / "run")), FolderInUse,
     "being written"),
    ("lock: an SCAE fine-tune in a folder in use", lambda e, t: held_by_another_process(
        t / "ft", "training run folder", lambda: train_scae_suite(
            make_suite(e.eager, 2), e.eager, TEXTS, all_connections(e.suite, e.eager), 1,
            save_dir=t / "ft",
            ctx_len=CTX, progress=False)), FolderInUse, "being written"),
    ("lock: an export into a folder being written", lambda e, t: held_by_another_process(
        t / "sl", "folder", lambda: export(e.root / "sae", t / "sl", to="saelens")), FolderInUse,
     "being written"),
    ("lock: a quickstart into a report folder in use", lambda e, t: held_by_another_process(
        t / "q", "report folder", lambda: quickstart(t)), FolderInUse, "being written"),
    ("lock: a killed writer blocks no one", lambda e, t: killed_holder_releases(t), None, None),
    ("lock: a finished writer leaves no lock file", lambda e, t: (
        save_dictionary(AutoEncoderTopK(D, DICT, K), t / "d"),
        [p.name for p in t.iterdir()] == ["d"] or
        (_ for _ in ()).throw(AssertionError(list(t.iterdir())))),
     None, None),
    # -------------------------------------------------------------------- mismatched state (silent)
    ("mismatch: connections from other parameters", lambda e, t: other_parameters(e, t), ValueError,
     "other parameters|fingerprint"),
    ("mismatch: connection weights NaN", lambda e, t: with_connection_weights(e, t, math.nan),
     ValueError, "NaN / inf"),
    ("mismatch: connection weights inf", lambda e, t: with_connection_weights(e, t, math.inf),
     ValueError, "NaN / inf"),
    ("mismatch: a suite used with another model of the same width",
     lambda e, t: suite_for_other_model(e, t), ValueError, "another model|other model|fingerprint"),
    ("mismatch: a cache of another model of the same width", lambda e, t: (
        write_cache(load_model("tiny-llama", seed=1), iter(TEXTS * 4), hook(e.model, 1, "resid"),
                    t / "c", n_tokens=256, ctx_len=32, model_name="tiny-llama", progress=False),
        quickstart(t, layer=1, cache=t / "c")), ValueError, "another model|other "
                                                            "model|fingerprint"),
    ("mismatch: a cache extended by another model of the same width", lambda e, t: (
        shutil.copytree(e.root / "cache", t / "c"),
        write_cache(load_model("tiny-llama", seed=1), iter(TEXTS * 8),
                    {"resid_1": hook(e.model, 1, "resid")}, t / "c", n_tokens=1024, ctx_len=32,
                    shard_tokens=128, model_name="tiny-llama", progress=False)), ValueError,
     "another model|other model|fingerprint|other settings"),
    ("mismatch: sparsify cfg num_latents vs weights", lambda e, t: (
        edit_json(copy(e, t, "sparsify") / "layers.1" / "cfg.json",
                  lambda c: {**c, "num_latents": 7}),
        load(t / "sparsify")), ValueError, "num_latents"),
    ("mismatch: sparsify cfg k above num_latents", lambda e, t: (
        edit_json(copy(e, t, "sparsify") / "layers.1" / "cfg.json", lambda c: {**c, "k": 10 ** 6}),
        load(t / "sparsify")), ValueError, r"\bk\b"),
    ("mismatch: sparsify cfg says a skip, the weights hold none", lambda e, t: (
        edit_json(copy(e, t, "sparsify") / "layers.1" / "cfg.json",
                  lambda c: {**c, "skip_connection": True}),
        load(t / "sparsify")), ValueError, "W_skip|skip"),
    ("mismatch: sparsify W_dec of another shape", lambda e, t: (
        edit_safetensors(copy(e, t, "sparsify") / "layers.1" / "sae.safetensors",
                         lambda s: {**s, "W_dec": s["W_dec"][:, :10].contiguous()}),
        load(t / "sparsify")), ValueError, "W_dec"),
    ("mismatch: SAELens standard with a threshold tensor", lambda e, t: (
        edit_json(copy(e, t, "saelens") / "cfg.json", lambda c: {**c, "architecture": "standard"}),
        edit_safetensors(t / "saelens" / "sae_weights.safetensors",
                         lambda s: {**s, "threshold": torch.ones(DICT)}),
        load(t / "saelens")), ValueError, "threshold"),
    ("mismatch: SAELens jumprelu without a threshold", lambda e, t: (
        edit_json(copy(e, t, "saelens") / "cfg.json", lambda c: {**c, "architecture": "jumprelu"}),
        load(t / "saelens")), ValueError, "threshold"),
    ("mismatch: SAELens topk without k", lambda e, t: (
        edit_json(copy(e, t, "saelens") / "cfg.json",
                  lambda c: {k: v for k, v in c.items() if k != "k"}),
        load(t / "saelens")), ValueError, r"\bk\b"),
    ("mismatch: SAELens W_skip in a plain SAE", lambda e, t: (
        edit_safetensors(copy(e, t, "saelens") / "sae_weights.safetensors",
                         lambda s: {**s, "W_skip": torch.zeros(D, D)}),
        load(t / "saelens")), ValueError, "W_skip"),
    ("mismatch: SAELens W_dec of another width", lambda e, t: (
        edit_safetensors(copy(e, t, "saelens") / "sae_weights.safetensors",
                         lambda s: {**s, "W_dec": s["W_dec"][:, :10].contiguous()}),
        load(t / "saelens")), ValueError, "W_dec|b_dec|d_out|shape"),
    ("mismatch: SAELens unknown tensor", lambda e, t: (
        edit_safetensors(copy(e, t, "saelens") / "sae_weights.safetensors",
                         lambda s: {**s, "W_gate": torch.zeros(D, DICT)}),
        load(t / "saelens")), ValueError, "W_gate"),
    ("mismatch: circuit-tracer layers of other widths", lambda e, t: (
        edit_safetensors(copy(e, t, "ct") / "layer_2.safetensors",
                         lambda s: {k: v[:, :32].contiguous() if v.dim() == 2 else v[:32]
                                    if k == "b_dec" else v
                                    for k, v in s.items()}),
        load(t / "ct")), ValueError, "layer 2|width|shape"),
    ("mismatch: circuit-tracer skip on some layers only", lambda e, t: (
        edit_safetensors(copy(e, t, "ct") / "layer_1.safetensors",
                         lambda s: {**s, "W_skip": torch.zeros(D, D)}),
        load(t / "ct")), ValueError, "W_skip|skip"),
    ("mismatch: circuit-tracer unknown tensor", lambda e, t: (
        edit_safetensors(copy(e, t, "ct") / "layer_0.safetensors",
                         lambda s: {**s, "W_gate": torch.zeros(4)}),
        load(t / "ct")), ValueError, "W_gate"),
    ("mismatch: BatchTopK module in a suite", lambda e, t: batchtopk_suite(e), TypeError,
     "AutoEncoderTopK|exact"),
    ("mismatch: Matryoshka module in a suite", lambda e, t: SCAESuite(
        {**dict(e.suite.dictionaries.items()),
         "attn_0": MatryoshkaBatchTopKSAE(D, 96, 8, [48, 48])}),
     TypeError, "AutoEncoderTopK|exact|TopK"),
    ("mismatch: ranks given different configs", lambda e, t: ranks_with_other_configs(t),
     ValueError, "differ between ranks|rank"),
    ("mismatch: dashboard --model of another width", lambda e, t: _dashboard(
        e.root / "sae", out=t / "d", model="tiny-gpt2",
                                                                    features=2, tokens=32,
        progress=False),
     ValueError, "width|48|64"),
    # ------------------------------------------------------------------ garbage files name the file
    ("garbage: SAELens cfg.json truncated",
     lambda e, t: (truncate(copy(e, t, "saelens") / "cfg.json"),
                                                         load(t / "saelens")), ValueError,
     "cfg.json"),
    ("garbage: SAELens cfg.json a list",
     lambda e, t: (copy(e, t, "saelens").joinpath("cfg.json").write_text("[1]"),
                                                      load(t / "saelens")), ValueError, "cfg.json"),
    ("garbage: SAELens weights truncated",
     lambda e, t: (truncate(copy(e, t, "saelens") / "sae_weights.safetensors"),
                                                        load(t / "saelens")), ValueError,
     "sae_weights.safetensors"),
    ("garbage: SAELens weights empty", lambda e, t: (
        copy(e, t, "saelens").joinpath("sae_weights.safetensors").write_bytes(b""),
        load(t / "saelens")),
     ValueError, "sae_weights.safetensors"),
    ("garbage: sparsify cfg.json truncated",
     lambda e, t: (truncate(copy(e, t, "sparsify") / "layers.1" / "cfg.json"),
                                                          load(t / "sparsify")), ValueError,
     "cfg.json"),
    ("garbage: sparsify cfg.json binary", lambda e, t: (
        copy(e, t, "sparsify").joinpath("layers.1", "cfg.json").write_bytes(b"\xff\x00"),
        load(t / "sparsify")),
     ValueError, "cfg.json"),
    ("garbage: sparsify weights truncated", lambda e, t: (
        truncate(copy(e, t, "sparsify") / "layers.1" / "sae.safetensors"), load(t / "sparsify")),
     ValueError, "sae.safetensors"),
    ("garbage: circuit-tracer config.yaml invalid", lambda e, t: (
        copy(e, t, "ct").joinpath("config.yaml").write_text("model_kind: [unclosed\n"),
        load(t / "ct")),
     ValueError, "config.yaml"),
    ("garbage: circuit-tracer config.yaml binary", lambda e, t: (
        copy(e, t, "ct").joinpath("config.yaml").write_bytes(b"\xff\xfe\x00"), load(t / "ct")),
     ValueError, "config.yaml"),
    ("garbage: circuit-tracer layer truncated", lambda e, t: (
        truncate(copy(e, t, "ct") / "layer_1.safetensors"), load(t / "ct")), ValueError,
     "layer_1.safetensors"),
    ("garbage: circuit-tracer layer missing a tensor", lambda e, t: (
        edit_safetensors(copy(e, t, "ct") / "layer_1.safetensors",
                         lambda s: {k: v for k, v in s.items() if k != "b_enc"}), load(t / "ct")),
     ValueError, "b_enc"),
    ("garbage: cache manifest truncated",
     lambda e, t: (truncate(copy(e, t, "cache") / "manifest.json"),
                                                       ActivationCache(t / "cache", 16)),
     ValueError, "manifest.json"),
    ("garbage: cache shard truncated",
     lambda e, t: (truncate(copy(e, t, "cache") / "shard_00001.safetensors"),
                                                    list(ActivationCache(t / "cache", 16))),
     ValueError, "shard_00001"),
    ("garbage: cache shard deleted",
     lambda e, t: (copy(e, t, "cache").joinpath("shard_00002.safetensors").unlink(),
                                                  ActivationCache(t / "cache", 16)), ValueError,
     "shard_00002"),
    ("garbage: connections.safetensors garbage", lambda e, t: (
        copy(e, t, "suite").joinpath("connections.safetensors").write_bytes(b"garbage"),
        SCAESuite.load(t / "suite")),
     ValueError, "connections"),
    ("garbage: suite.json binary",
     lambda e, t: (copy(e, t, "suite").joinpath("suite.json").write_bytes(b"\xff"),
                                                SCAESuite.load(t / "suite")), ValueError,
     "suite.json"),
    ("garbage: a dictionary folder's model.safetensors garbage, no ae.pt", lambda e, t: (
        copy(e, t, "sae").joinpath("ae.pt").unlink(),
        (t / "sae" / "model.safetensors").write_bytes(b"junk"),
        load_dictionary(t / "sae")), ValueError, "model.safetensors"),
    ("garbage: a crafted checkpoint in a suite fine-tune folder", lambda e, t: (
        t.joinpath("ft").mkdir(),
        torch.save({"trainers": [RunsCode(t / "pwned")], "step": 1}, t / "ft" / "checkpoint.pt"),
        train_scae_suite(make_suite(e.eager, 2), e.eager, TEXTS, all_connections(e.suite, e.eager),
                         1,
                         save_dir=t / "ft", resume=True, ctx_len=CTX, progress=False)), ValueError,
     "could run code"),
    # ----------------------------------------------------------------- bounds before work, no hangs
    ("bound: random_connections near half the source features",
     lambda e, t: random_connections_near_half(e), None, None),
    ("bound: random_connections with every source feature", lambda e, t: timed(
        10, random_connections, e.suite, e.suite.n_sources("mlp_1"), 0, e.eager).validate(e.suite),
     None, None),
    ("bound: random_connections C 0", lambda e, t: random_connections(e.suite, 0), ValueError,
     "C must be a positive int"),
    ("bound: a launch whose second rank never comes", lambda e, t: lone_rank_times_out(t),
     RuntimeError, "timed out|timeout|did not join|rank"),
    ("bound: init_distributed timeout 0", lambda e, t: __import__(
        "dictionary_learning.training", fromlist=["x"]).init_distributed(timeout=0), ValueError,
     "timeout"),
    ("bound: ActivationBuffer n_ctxs 1e9", lambda e, t: ActivationBuffer(
        iter(TEXTS), e.model, hook(e.model, 1, "resid"), n_ctxs=10 ** 9, ctx_len=32), ValueError,
     memory_bound("n_ctxs")),
    ("bound: ActivationBuffer n_ctxs 1e9 as a float", lambda e, t: ActivationBuffer(
        iter(TEXTS), e.model, hook(e.model, 1, "resid"), n_ctxs=1e9, ctx_len=32), ValueError,
     memory_bound("n_ctxs")),
    ("bound: dictionary of 2**40 features", lambda e, t: AutoEncoderTopK(D, 2 ** 40, K), ValueError,
     memory_bound("dict_size")),
    ("bound: ReLU dictionary of 2**36 features", lambda e, t: AutoEncoder(D, 2 ** 36), ValueError,
     memory_bound("dict_size")),
    ("bound: JumpReLU of 2**36 features", lambda e, t: JumpReluAutoEncoder(D, 2 ** 36), ValueError,
     memory_bound("dict_size")),
    ("bound: trainSAE config dict_size 2**38",
     lambda e, t: train(configs=[topk(dict_size=2 ** 38)]), ValueError, memory_bound("dict_size")),
    ("bound: quickstart --tokens 10**10", lambda e, t: quickstart(t, tokens=10 ** 10), ValueError,
     memory_bound("tokens")),
    ("bound: collect --tokens 10**11",
     lambda e, t: cli("collect", "--model", "tiny-llama", "--tokens",
                                                      str(10 ** 11), "--ctx-len", "32"), ValueError,
     memory_bound("tokens")),
    ("bound: take 10**11 tokens", lambda e, t: ActivationBuffer(
        iter(TEXTS), e.model, hook(e.model, 1, "resid"), n_ctxs=2, ctx_len=32).take(10 ** 11),
     ValueError, memory_bound("n_tokens")),
    ("bound: write_cache beyond the free disk", lambda e, t: write_cache(
        e.model, iter(TEXTS), hook(e.model, 1, "resid"), t / "c", n_tokens=10 ** 13, ctx_len=32,
        progress=False),
     ValueError, "disk"),
    ("bound: --tokens 1e9 is not an integer", lambda e, t: cli("train", "--tokens", "1e9"),
     SystemExit, "2"),
    ("bound: a 20 MB text of one line is cut in linear time", lambda e, t: timed(
        10, lambda: sum(1 for _ in passages("word " * 4_000_000))), None, None),
    ("bound: a 20 MB text without spaces",
     lambda e, t: timed(10, lambda: sum(1 for _ in passages("x" * 20_000_000))), None, None),
    ("bound: dashboard features beyond the dictionary", lambda e, t: _dashboard(
        e.root / "sae", out=t / "d", features="0-999999",
                                                                    progress=False), ValueError,
     r"features must lie in \[0, 127\]"),
    ("bound: select_connections C above every source feature", lambda e, t: select_connections(
        e.suite, e.eager, TEXTS[:4], 10 ** 6, ctx_len=CTX, progress=False).validate(e.suite), None,
     None),
    # ----------------------------------------------------------- the command line on these surfaces
    ("cli: export --to sparsify of a crafted hook", lambda e, t: cli(
        "export", "--to", "sparsify", str(crafted_sae(e, t, [{"path": "../../x", "io": "output"}])),
        str(t / "o")),
     ValueError, "hookpoint"),
    ("cli: export --hookpoint ../x",
     lambda e, t: cli("export", "--to", "sparsify", str(e.root / "sae"), str(t / "o"),
                                                      "--hookpoint", "../x"), ValueError,
     "hookpoint"),
    ("cli: export one SAE to circuit-tracer", lambda e, t: cli("export", "--to", "circuit-tracer",
                                                               str(e.root / "sae"), str(t / "o")),
     ValueError, "transcoder"),
    ("cli: import a truncated SAELens folder",
     lambda e, t: (truncate(copy(e, t, "saelens") / "cfg.json"),
                                                            cli("import", str(t / "saelens"),
                                                                str(t / "o"))),
     ValueError, "cfg.json"),
    ("cli: import an empty folder",
     lambda e, t: (t.joinpath("empty").mkdir(), cli("import", str(t / "empty"), str(t / "o"))),
     ValueError, "holds none of the formats"),
    ("cli: dashboard of a whole suite",
     lambda e, t: cli("dashboard", "--dictionary", str(e.root / "suite"), "--out", str(t / "d")),
     ValueError, "pass one of its modules"),
    ("cli: dashboard --model of another width", lambda e, t: cli(
        "dashboard", "--dictionary", str(e.root / "sae"), "--model", "tiny-gpt2", "--out",
        str(t / "d")), ValueError,
     "width 64.*width 48"),
    ("cli: dashboard of a dictionary of another model of the same width", lambda e, t: (
        edit_json(copy(e, t, "sae") / "config.json",
                  lambda c: {**c,
                             "buffer": {**c["buffer"], "model_fingerprint": "0123456789abcdef"}}),
        cli("dashboard", "--dictionary", str(t / "sae"), "--out", str(t / "d"), "--tokens", "32")),
     ValueError, "another model"),
    ("cli: collect into a folder of other files", lambda e, t: (
        t.joinpath("notes").mkdir(), t.joinpath("notes", "a.txt").write_text("x"),
        cli("collect", "--model", "tiny-llama", "--tokens", "64", "--out", str(t / "notes"))),
     ValueError, "not an activation cache"),
    ("cli: train --cache of a folder that is no cache", lambda e, t: (
        t.joinpath("nocache").mkdir(), cli("train", "--model", "tiny-llama", "--cache",
                                           str(t / "nocache"), "--out", str(t / "q"))), ValueError,
     "not an activation cache"),
    ("cli: train --cache with another --ctx-len", lambda e, t: cli(
        "train", "--model", "tiny-llama", "--layer", "1", "--cache", str(e.root / "cache"),
        "--ctx-len", "64",
        "--out", str(t / "q")), ValueError, "collected with ctx_len=32"),
    ("cli: scae of a suite whose connections hold NaN", lambda e, t: (
        edit_safetensors(copy(e, t, "suite") / "connections.safetensors",
                         lambda c: {k: v.fill_(math.nan) if k.endswith("weights") else v
                                    for k, v in c.items()}),
        cli("scae", "--suite", str(t / "suite"), "--model", "tiny-llama")), ValueError,
     "NaN / inf"),
    # ----------------------------------------------------------------- more divergence and numerics
    ("diverge: JumpReLU on huge activations",
     lambda e, t: train(data=stream(scale=1e25), configs=[dict(
        trainer=JumpReluTrainer, activation_dim=D, dict_size=DICT, target_l0=4.0, steps=6,
        seed=0)]),
     FloatingPointError, r"step \d+"),
    ("diverge: StandardTrainer on huge activations",
     lambda e, t: train(data=stream(scale=1e25), configs=[dict(
        trainer=StandardTrainer, activation_dim=D, dict_size=DICT, lr=1e-3, l1_penalty=0.1, steps=6,
        seed=0,
        warmup_steps=1)]), FloatingPointError, r"step \d+"),
    ("diverge: Matryoshka on huge activations",
     lambda e, t: train(data=stream(scale=1e25), configs=[dict(
        trainer=MatryoshkaBatchTopKTrainer, activation_dim=D, dict_size=DICT, k=K, steps=6, seed=0,
        group_fractions=[0.5, 0.5])]), FloatingPointError, r"step \d+"),
    ("diverge: a transcoder on huge targets", lambda e, t: train(
        data=((x, x * 1e25) for x in stream()), configs=[topk(transcoder=True)]),
     FloatingPointError, r"step \d+"),
    ("diverge: two trainers, the second diverges",
     lambda e, t: train(configs=[topk(), topk(lr=1e30, seed=1)]), FloatingPointError, "trainer 1"),
    ("diverge: SCAE fine-tune with lr 1e30", lambda e, t: train_scae_suite(
        make_suite(e.eager, 2), e.eager, TEXTS * 2, all_connections(e.suite, e.eager), 4, lr=1e30,
        batch_texts=4,
        ctx_len=CTX, progress=False), FloatingPointError, r"step \d+"),
    ("diverge: end-to-end with lr 1e30", lambda e, t: trainSAE(
        (TEXTS[i:i + 4] for i in range(0, 16, 4)), [topk(4, lr=1e30)], 4, progress=False,
        end_to_end={"model": e.model, "hooks": (hook(e.model, 1, "resid"),), "ctx_len": 24}),
     FloatingPointError, r"step \d+"),
    ("diverge: the CLI reports a diverged quickstart in one line", lambda e, t: cli(
        "train", "--model", "tiny-llama", "--tokens", "400", "--steps", "3", "--batch", "64",
        "--dict-size", "64", "--k", "4", "--lr", "1e30", "--eval-texts", "8", "--eval-tokens",
        "128", "--ctx-len", "32",
        "--dashboard-features", "0", "--out", str(t / "q")), FloatingPointError, "diverged"),
    ("eval: inf dictionary weights", lambda e, t: evaluate(
        AutoEncoderTopK(D, DICT, K).requires_grad_(False).apply(
            lambda m: [p.fill_(math.inf) for p in m.parameters(recurse=False)]),
        iter([torch.randn(8, D)]), progress=False), ValueError, "NaN / inf"),
    ("eval: reconstruction_metrics on inf", lambda e, t: reconstruction_metrics(
        AutoEncoderTopK(D, DICT, K), torch.full((4, D), math.inf)), ValueError, "NaN / inf"),
    ("eval: a transcoder's NaN targets", lambda e, t: reconstruction_metrics(
        AutoEncoderTopK(D, DICT, K, transcoder=True),
        (torch.randn(4, D), torch.full((4, D), math.nan))),
     ValueError, "NaN / inf"),
    ("eval: KL score with nothing to recover", lambda e, t: _flat_kl_score(), None, None),
    ("eval: recovered fraction with an infinite baseline", lambda e, t: _infinite_baseline(), None,
     None),
    ("eval: evaluate on zero-variance data", lambda e, t: _evaluate_constant(), None, None),
    # --------------------------------------------------------------------- more formats and loading
    ("format: SAELens run-time normalisation", lambda e, t: (
        edit_json(copy(e, t, "saelens") / "cfg.json",
                  lambda c: {**c, "normalize_activations": "layer_norm"}),
        load(t / "saelens")), ValueError, "normalize_activations"),
    ("format: SAELens cfg d_sae disagrees", lambda e, t: (
        edit_json(copy(e, t, "saelens") / "cfg.json", lambda c: {**c, "d_sae": 7}),
        load(t / "saelens")),
     ValueError, "d_sae=7"),
    ("format: sparsify run of two hookpoints, none named", lambda e, t: (
        shutil.copytree(e.root / "sparsify" / "layers.1", copy(e, t, "sparsify") / "layers.2"),
        load(t / "sparsify")), ValueError, "pass hookpoint"),
    ("format: circuit-tracer model_kind of another kind", lambda e, t: (
        copy(e, t, "ct").joinpath("config.yaml").write_text(
            (t / "ct" / "config.yaml").read_text().replace("transcoder_set",
                                                           "cross_layer_transcoder")),
        load(t / "ct")), ValueError, "model_kind"),
    ("format: circuit-tracer negative thresholds", lambda e, t: (
        edit_safetensors(copy(e, t, "ct") / "layer_0.safetensors",
                         lambda s: {**s, "activation_function.threshold": -torch.ones(DICT)}),
        load(t / "ct")), ValueError, "negative thresholds"),
    ("format: export a ReLU SAE to sparsify", lambda e, t: export(
        (AutoEncoder(D, DICT), sae_config()), t / "o", to="sparsify"), ValueError, "TopK"),
    ("format: load() of a file, not a folder", lambda e, t: load(e.root / "saelens" / "cfg.json"),
     ValueError, "holds none of the formats"),
    ("format: export to a file's place", lambda e, t: (t.joinpath("afile").write_text("x"),
                                                      export(e.root / "sae", t / "afile",
                                                             to="saelens")),
     NotADirectoryError, "afile"),
    # -------------------------------------------------------------------- more distributed and SCAE
    ("dist: shard rank out of range", lambda e, t: list(__import__(
        "dictionary_learning.training", fromlist=["x"]).shard(range(4), 2, 2)), ValueError,
     "rank must be in"),
    ("dist: distributed='model'", lambda e, t: train(distributed="model"), ValueError,
     "distributed must be"),
    ("dist: init_distributed timeout 'x'", lambda e, t: __import__(
        "dictionary_learning.training", fromlist=["x"]).init_distributed(timeout="x"), ValueError,
     "timeout"),
    ("scae: top(0)", lambda e, t: e.suite.connections.top(0), ValueError,
     "C must be a positive int"),
    ("scae: a suite fine-tuned by hand, then evaluated with its old connections",
     lambda e, t: _stale_in_memory(e), ValueError, "other parameters"),
    ("scae: connections saved by an older version (no fingerprint) still load",
     lambda e, t: _no_fingerprint(e, t), None, None),
    # ---------------------------------------------------------------------- no work lost at the end
    ("end: no feature in the top-contexts density window", lambda e, t: no_feature_in_the_window(t),
     None, None),
    ("end: quickstart n_features 0", lambda e, t: quickstart(t, n_features=0), None, None),
    ("end: a failing extra leaves the figures", lambda e, t: metrics_kept_when_top_contexts_fail(t),
     None, None),
    ("end: dashboard of an imported SAELens folder", lambda e, t: imported_saelens_dashboard(e, t),
     None, None),
    ("end: export of the quickstart's SAE names its hook", lambda e, t: (
        quickstart(t), export(t / "q" / "sae" / "trainer_0", t / "sl", to="saelens"),
        json.loads((t / "sl" / "cfg.json").read_text())["metadata"]["hook_name"] == "model.layers.2"
        or (_ for _ in ()).throw(AssertionError("no hook name"))), None, None),
]


def _flat_recovered(env):
    """A hook point whose zero-ablation leaves the loss unchanged (CE zero == CE clean): the
    recovered fraction is undefined, reported as NaN with a warning, not as a huge or infinite
    number."""
    from dictionary_learning.core_metrics import recovered_fraction

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fraction = recovered_fraction(torch.tensor(2.5), torch.tensor(2.7), torch.tensor(2.5))
    assert (math.isnan(fraction)
            and any("undefined" in str(w.message) for w in seen)), (fraction, seen)


def _flat_kl_score():
    """A KL score whose ablation changes nothing (KL zero-ablated 0): undefined, NaN with a
    warning."""
    from dictionary_learning.core_metrics import saebench_names

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        named = saebench_names({"ce_clean": 2.0, "ce_patched": 2.1, "ce_zero": 2.0,
                                "kl_patched": 0.1, "kl_zero": 0.0})
    assert (math.isnan(named["kl_div_score"]) and math.isnan(named["ce_loss_score"])
            and len(seen) == 2), named


def _infinite_baseline():
    from dictionary_learning.core_metrics import recovered_fraction

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert math.isnan(recovered_fraction(math.inf, 2.0, 1.0))


def _evaluate_constant():
    """evaluate over batches of one repeated vector: MSE as measured, FVU and explained variance
    NaN, warned."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        metrics = evaluate(AutoEncoderTopK(D, DICT, K), iter([torch.ones(8, D)] * 2), n_batches=2,
                           progress=False)
    assert (metrics["mse"] > 0 and math.isnan(metrics["fvu"])
            and math.isnan(metrics["explained_variance"])), metrics
    assert any("no variance" in str(w.message) for w in seen)


def _stale_in_memory(env):
    """A suite changed in memory after its connections were selected: using those connections is
    refused."""
    from dictionary_learning.scae import evaluate_suite

    suite = SCAESuite.load(env.root / "suite")
    with torch.no_grad():
        suite["attn_1"].encoder.bias.add_(1.0)
    evaluate_suite(suite, env.eager, TEXTS[:2], suite.connections, ctx_len=CTX)


def _no_fingerprint(env, tmp):
    """Connections written before fingerprints existed (no metadata) load and are used as before."""
    folder = copy(env, tmp, "suite")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "connections.safetensors"))
    save_file(tensors, str(folder / "connections.safetensors"))  # no metadata
    assert SCAESuite.load(folder).connections.fingerprint is None


@pytest.mark.parametrize("name, run, expected, message", CASES, ids=[case[0] for case in CASES])
def test_surface_case(env, tmp_path, name, run, expected, message):
    """The expected error (type and message), the expected warning, or a correct result; never a
    write outside the case's folder and never code run from a file."""
    import signal

    def hang(*_):
        raise TimeoutError(f"{name}: over 120 s (a hang)")

    signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    try:
        _run_case(env, tmp_path, run, expected, message)
    finally:
        signal.alarm(0)


def _run_case(env, tmp_path, run, expected, message):
    before = set(p.name for p in tmp_path.parent.iterdir())
    if expected is None:
        run(env, tmp_path)
    elif isinstance(expected, type) and issubclass(expected, Warning):
        with pytest.warns(expected, match=message):
            run(env, tmp_path)
    else:
        with pytest.raises(expected,
                           match=message if expected is not SystemExit else None) as raised:
            run(env, tmp_path)
        if expected is SystemExit:
            assert raised.value.code == 2
    assert not (tmp_path / "pwned").exists(), "a crafted file ran code"
    assert (sorted(set(p.name for p in tmp_path.parent.iterdir()) - before)
            == []), "a file appeared outside"

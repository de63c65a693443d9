"""The bad-input sweep: every public entry point against each class of bad input (wrong type, wrong
width, empty, zero / negative / NaN / inf, too large, missing or corrupted files, a file in the
way). Each case ends in a clear error (its type and a message naming the parameter, what was
expected and what came) or in a correct result. The cases include every one that
../shared/findings/reliability.md found confusing, silent or unsafe."""

import json
import math
import os
import types
import warnings

import numpy as np
import pytest
import torch

from dictionary_learning import ActivationBuffer, hook
from dictionary_learning.__main__ import main
from dictionary_learning.dictionary import AutoEncoder, AutoEncoderTopK, BatchTopKSAE
from dictionary_learning.scae import (
    Connections,
    SCAESuite,
    all_connections,
    ce_versus_c,
    select_connections,
    train_scae_suite,
)
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary, save_dictionary

from ..helpers import CTX, RunsCode, make_suite, planted_features, planted_stream, random_texts

D, DICT, K = 16, 32, 4
TEXTS = random_texts(12, seed=3)


def make_env(root):
    """What the cases share: the tiny model, an eager twin for SCAE, a saved dictionary and a saved
    suite."""
    from dictionary_learning import load_model

    eager = load_model("tiny-llama", attn_implementation="eager")
    torch.manual_seed(0)
    save_dictionary(AutoEncoderTopK(D, DICT, K), root / "topk")
    suite = make_suite(eager, n_layer=2)
    suite.connections = all_connections(suite, eager)
    suite.save(root / "suite")
    return types.SimpleNamespace(model=load_model("tiny-llama"), eager=eager, root=root,
                                 suite=suite)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("sweep"))


def buffer(env, data=TEXTS, submodule="model.layers.1", **overrides):
    kwargs = dict(n_ctxs=4, ctx_len=16, refresh_batch_size=4, out_batch_size=32)
    return ActivationBuffer(data, env.model, submodule, **{**kwargs, **overrides})


def config(steps=5, **overrides):
    return {**dict(trainer=TopKTrainer, dict_class=AutoEncoderTopK, activation_dim=D,
                   dict_size=DICT, k=K, lr=1e-3, steps=steps, seed=0), **overrides}


def stream(n=6, batch=32, width=D):
    return planted_stream(planted_features(DICT, width, seed=0), 2, batch, n, seed=1)


def train(data=None, configs=None, steps=5, **kwargs):
    return trainSAE(stream() if data is None else data, configs or [config(steps)], steps,
                    progress=False, **kwargs)


def copy_saved(env, tmp, name="topk"):
    import shutil

    shutil.copytree(env.root / name, tmp / name)
    return tmp / name


def edit_json(path, edit):
    value = json.loads(path.read_text())
    path.write_text(json.dumps(edit(value)))


def truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def suite_with(env, **replace):
    modules = dict(env.suite.dictionaries.items())
    modules.update(replace)
    return modules


def connections_with(env, name, **fields):
    c = env.suite.connections
    indices, weights = dict(c.indices), dict(c.weights)
    if "indices" in fields:
        indices[name] = fields["indices"]
    if "weights" in fields:
        weights[name] = fields["weights"]
    if fields.get("drop_weights"):
        weights.pop(name)
    if fields.get("drop"):
        indices.pop(name)
    return Connections(indices, weights)


def mlp1_indices(env):
    return env.suite.connections.indices["mlp_1"]


def trained_checkpoint(tmp, **kwargs):
    train(save_dir=tmp, checkpoint_steps=2, keep_checkpoint=True, **kwargs)
    return tmp / "checkpoint.pt"


def resume_with(tmp, checkpoint_edit=None, configs=None):
    path = trained_checkpoint(tmp)
    if checkpoint_edit:
        checkpoint_edit(path)
    train(save_dir=tmp, resume=True, configs=configs)


def cli(*args):
    return main(list(args))


def no_training(tmp, **kwargs):
    """trainSAE with a stream that counts what was consumed: errors must come before any batch is
    read."""
    consumed = []

    def counted():
        for batch in stream():
            consumed.append(1)
            yield batch

    try:
        train(counted(), **kwargs)
    finally:
        assert not consumed, f"{len(consumed)} batches were consumed before the error"


CASES = [
    # ---------------------------------------------------------------- ActivationBuffer
    ("buf: no such module path", lambda e, t: buffer(e, submodule="model.layers.99.mlp"),
     ValueError, "no module"),
    ("buf: layer out of range", lambda e, t: hook(e.model, 9, "resid"), ValueError,
     r"layer must be an int in \[0, 3\]"),
    ("buf: negative layer", lambda e, t: hook(e.model, -1, "resid"), ValueError,
     "layer must be an int"),
    ("buf: unknown site", lambda e, t: hook(e.model, 1, "bogus"), ValueError,
     "unknown site 'bogus'"),
    ("buf: submodule None", lambda e, t: buffer(e, submodule=None), TypeError, "submodule must be"),
    ("buf: submodule int", lambda e, t: buffer(e, submodule=3), TypeError, "submodule must be"),
    ("buf: foreign module", lambda e, t: buffer(e, submodule=torch.nn.Linear(2, 2)), ValueError,
     "not part of the model"),
    ("buf: wrong d_submodule", lambda e, t: buffer(e, d_submodule=65), ValueError,
     "d_submodule=65 does not match"),
    ("buf: d_submodule str", lambda e, t: buffer(e, d_submodule="64"), ValueError,
     "d_submodule must be a positive int"),
    ("buf: d_submodule fraction", lambda e, t: buffer(e, d_submodule=64.5), ValueError,
     "d_submodule must be a positive int"),
    ("buf: data None", lambda e, t: buffer(e, data=None), TypeError,
     "data must be an iterable of texts"),
    ("buf: data 5", lambda e, t: buffer(e, data=5), TypeError,
     "data must be an iterable of texts .*got int"),
    ("buf: data empty", lambda e, t: buffer(e, data=[]), ValueError, "data yielded no text"),
    ("buf: data of ints", lambda e, t: buffer(e, data=[1, 2]), TypeError,
     "data must yield strings, got int"),
    ("buf: a later non-string", lambda e, t: list(buffer(e, data=["a b c", 3])), TypeError, "got "
                                                                                            "int"),
    ("buf: a bare string", lambda e, t: buffer(e, data="one text"), TypeError, "single string"),
    ("buf: only whitespace texts",
     lambda e, t: next(buffer(e, data=[" ", "\n"], add_special_tokens=False)), ValueError,
     "yielded no activations"),
    ("buf: ctx_len 0", lambda e, t: buffer(e, ctx_len=0), ValueError,
     "ctx_len must be a positive int, got 0"),
    ("buf: ctx_len too long", lambda e, t: buffer(e, ctx_len=257), ValueError,
     "maximum context of 256"),
    ("buf: ctx_len 1 with remove_bos", lambda e, t: buffer(e, ctx_len=1, remove_bos=True),
     ValueError, "keeps no token"),
    ("buf: out_batch_size 0", lambda e, t: buffer(e, out_batch_size=0), ValueError,
     "out_batch_size must be"),
    ("buf: out_batch_size -5", lambda e, t: buffer(e, out_batch_size=-5), ValueError,
     "out_batch_size must be"),
    ("buf: out_batch_size None", lambda e, t: buffer(e, out_batch_size=None), ValueError,
     "out_batch_size must be a positive int, got None"),
    ("buf: out_batch_size nan", lambda e, t: buffer(e, out_batch_size=math.nan), ValueError,
     "out_batch_size must be a positive int, got nan"),
    ("buf: out_batch_size 2.5", lambda e, t: buffer(e, out_batch_size=2.5), ValueError, "got 2.5"),
    ("buf: n_ctxs 0", lambda e, t: buffer(e, n_ctxs=0), ValueError, "n_ctxs must be"),
    ("buf: refresh_batch_size 0", lambda e, t: buffer(e, refresh_batch_size=0), ValueError,
     "refresh_batch_size"),
    ("buf: io bogus", lambda e, t: buffer(e, io="bogus"), ValueError, "io must be one of"),
    ("buf: a pair with io=out",
     lambda e, t: buffer(e, submodule=("model.layers.0", "model.layers.1")), ValueError,
     "needs io='in_to_out'"),
    ("buf: in_to_out triple",
     lambda e, t: buffer(e, submodule=("model.layers.0",) * 3, io="in_to_out"), ValueError,
     "got 3 items"),
    ("buf: in_to_out one hook point",
     lambda e, t: buffer(e, submodule=hook(e.model, 1, "mlp_out"), io="in_to_out"), ValueError,
     "two different hook points"),
    ("buf: dtype as a string", lambda e, t: buffer(e, dtype="float16"), TypeError,
     "dtype must be a floating-point torch.dtype"),
    ("buf: integer dtype", lambda e, t: buffer(e, dtype=torch.int64), TypeError, "floating-point"),
    ("buf: device bogus", lambda e, t: buffer(e, device="bogus"), RuntimeError,
     "Expected one of cpu"),
    ("buf: take(0)", lambda e, t: buffer(e).take(0), ValueError,
     "n_tokens must be a positive int, got 0"),
    ("buf: take(-3)", lambda e, t: buffer(e).take(-3), ValueError,
     "n_tokens must be a positive int, got -3"),
    ("buf: capacity below out_batch_size", lambda e, t: buffer(e, n_ctxs=1, out_batch_size=4096),
     UserWarning, "fewer than out_batch_size"),
    # ---------------------------------------------------------------- dictionaries
    ("dict: k > dict_size", lambda e, t: AutoEncoderTopK(D, DICT, 33), ValueError,
     r"k must be an int in \[1, dict_size=32\], got 33"),
    ("dict: k 0", lambda e, t: AutoEncoderTopK(D, DICT, 0), ValueError, "got 0"),
    ("dict: k -1", lambda e, t: AutoEncoderTopK(D, DICT, -1), ValueError, "got -1"),
    ("dict: k 4.0", lambda e, t: AutoEncoderTopK(D, DICT, 4.0), ValueError, "got 4.0"),
    ("dict: k True", lambda e, t: AutoEncoderTopK(D, DICT, True), ValueError, "got True"),
    ("dict: BatchTopK k > dict_size", lambda e, t: BatchTopKSAE(D, DICT, 40), ValueError, "got 40"),
    ("dict: dict_size -3", lambda e, t: AutoEncoder(D, -3), ValueError,
     "dict_size must be a positive int, got -3"),
    ("dict: dict_size 'big'", lambda e, t: AutoEncoder(D, "big"), ValueError, "got 'big'"),
    ("dict: dict_size True", lambda e, t: AutoEncoder(D, True), ValueError,
     "dict_size must be a positive int"),
    ("dict: activation_dim 0", lambda e, t: AutoEncoder(0, DICT), ValueError,
     "activation_dim must be"),
    ("dict: output_dim -1", lambda e, t: AutoEncoderTopK(D, DICT, K, output_dim=-1), ValueError,
     "output_dim must be"),
    ("dict: wrong input width", lambda e, t: AutoEncoderTopK(D, DICT, K)(torch.randn(5, 17)),
     ValueError, r"expected input width 16, got shape \(5, 17\)"),
    ("dict: encode() wrong width",
     lambda e, t: AutoEncoderTopK(D, DICT, K).encode(torch.randn(5, 17)), ValueError,
     "expected input width 16"),
    ("dict: ReLU encode() wrong width",
     lambda e, t: AutoEncoder(D, DICT).encode(torch.randn(5, 17)), ValueError,
     "expected input width 16"),
    ("dict: float64 input",
     lambda e, t: AutoEncoderTopK(D, DICT, K)(torch.randn(5, D, dtype=torch.float64)), TypeError,
     "dictionary's dtype torch.float32, got torch.float64"),
    ("dict: float16 input to ReLU", lambda e, t: AutoEncoder(D, DICT)(torch.randn(5, D).half()),
     TypeError, "dictionary's dtype"),
    ("dict: integer input",
     lambda e, t: AutoEncoderTopK(D, DICT, K)(torch.ones(5, D, dtype=torch.long)), TypeError,
     "floating-point"),
    ("dict: numpy input", lambda e, t: AutoEncoderTopK(D, DICT, K)(np.zeros((5, D), np.float32)),
     TypeError, "expected a torch.Tensor"),
    ("dict: threshold never learned",
     lambda e, t: AutoEncoderTopK(D, DICT, K).encode(torch.randn(5, D),
                                                                                       use_threshold=True),
     ValueError, "needs a learned threshold"),
    ("dict: fold_scale(0, 1)", lambda e, t: AutoEncoderTopK(D, DICT, K).fold_scale(0, 1),
     ValueError, "scale_in must be a positive finite number, got 0"),
    ("dict: fold_scale(nan, 1)", lambda e, t: AutoEncoderTopK(D, DICT, K).fold_scale(math.nan, 1),
     ValueError, "scale_in"),
    # ---------------------------------------------------------------- trainSAE
    ("train: unknown config key", lambda e, t: train(configs=[config(learning_rate=1)]), ValueError,
     r"unknown TopKTrainer config keys \['learning_rate'\]"),
    ("train: missing k",
     lambda e, t: train(configs=[{k: v for k, v in config().items() if k != "k"}]), TypeError,
     "TopKTrainer is missing 1 required argument.*'k'"),
    ("train: one config not in a list",
     lambda e, t: trainSAE(stream(), config(), 5, progress=False), TypeError,
     "list of trainer config dicts, got dict"),
    ("train: no configs", lambda e, t: trainSAE(stream(), [], 5, progress=False), ValueError,
     "trainer_configs is empty"),
    ("train: misspelled trainer", lambda e, t: train(configs=[config(trainer="TopKTrainr")]),
     ValueError, "unknown trainer 'TopKTrainr'"),
    ("train: no trainer key",
     lambda e, t: train(configs=[{k: v for k, v in config().items() if k != "trainer"}]),
     ValueError, "config\\['trainer'\\] must be a trainer class"),
    ("train: unknown dict_class", lambda e, t: train(configs=[config(dict_class="Foo")]),
     ValueError, "unknown dict_class 'Foo'"),
    ("train: k > dict_size", lambda e, t: train(configs=[config(k=33)]), ValueError,
     "k must be an int in"),
    ("train: width mismatch, nothing written",
     lambda e, t: train(configs=[config(activation_dim=17)], save_dir=t / "run"), ValueError,
     r"expected input width 17"),
    ("train: steps 0", lambda e, t: train(steps=0), ValueError,
     "steps must be a positive int, got 0"),
    ("train: steps -5", lambda e, t: train(steps=-5), ValueError, "got -5"),
    ("train: steps 2.5", lambda e, t: trainSAE(stream(), [config()], 2.5, progress=False),
     ValueError, "got 2.5"),
    ("train: config steps below the run's", lambda e, t: train(configs=[config(3)], steps=5),
     ValueError, "has steps=3, fewer than the steps=5"),
    ("train: NaN in a batch", lambda e, t: train(data=(b if i != 2 else b.fill_(math.nan)
                                                       for i, b in enumerate(stream()))),
     ValueError, "NaN / inf"),
    ("train: inf in a batch", lambda e, t: train(data=(b.fill_(math.inf) for b in stream())),
     ValueError, "NaN / inf"),
    ("train: empty stream", lambda e, t: train(data=iter([]), save_dir=t / "run"), ValueError,
     "no batches"),
    ("train: empty stream, normalised",
     lambda e, t: train(data=iter([]), normalize_activations=True), ValueError, "no batches"),
    ("train: normalization_batches 0",
     lambda e, t: train(normalize_activations=True, normalization_batches=0), ValueError,
     "normalization_batches must be a positive int, got 0"),
    ("train: batches of 0 rows", lambda e, t: train(data=iter([torch.zeros(0, D)] * 6)), ValueError,
     "at least one activation vector"),
    ("train: lr -1", lambda e, t: train(configs=[config(lr=-1)]), ValueError,
     "lr must be a finite number >= 0"),
    ("train: numpy batches", lambda e, t: train(data=(b.numpy() for b in stream())), TypeError,
     "expected a torch.Tensor"),
    ("train: transcoder fed single tensors",
     lambda e, t: train(configs=[config(output_dim=8, transcoder=True)]), ValueError,
     "transcoder: batches must be"),
    ("train: transcoder targets of the wrong width",
     lambda e, t: train(data=((x, x[:, :7]) for x in stream()),
                        configs=[config(output_dim=8, transcoder=True)]),
     ValueError, r"expected targets of shape \[32, 8\], got \(32, 7\)"),
    ("train: a batch triple", lambda e, t: train(data=((x, x, x) for x in stream()),
                                                 configs=[config(output_dim=8, transcoder=True)]),
     ValueError, "pair"),
    ("train: an SAE fed (x, y != x)", lambda e, t: train(data=((x, x.flip(0)) for x in stream())),
     ValueError, "y != x"),
    ("train: checkpoint_steps 0",
     lambda e, t: no_training(t, save_dir=t / "run", checkpoint_steps=0), ValueError,
     "checkpoint_steps must be a positive int, got 0"),
    ("train: negative save step",
     lambda e, t: no_training(t, save_dir=t / "run", save_steps=[0, -3]), ValueError,
     "each of save_steps must be an int >= 0, got -3"),
    ("train: save_steps 0", lambda e, t: no_training(t, save_dir=t / "run", save_steps=0),
     ValueError, "save_steps must be a positive int"),
    ("train: device bogus", lambda e, t: train(configs=[config(device="bogus")]), RuntimeError,
     "Expected one of"),
    ("train: save_dir is a file", lambda e, t: (t.joinpath("afile").write_text("x"),
                                                no_training(t, save_dir=t / "afile")),
     NotADirectoryError, "save_dir must be a folder, but .*afile' is a file"),
    ("train: save_dir below a file", lambda e, t: (t.joinpath("afile").write_text("x"),
                                                   no_training(t, save_dir=t / "afile" / "run")),
     NotADirectoryError, "save_dir must be a folder, but .*afile' is a file"),
    ("train: resume without save_dir", lambda e, t: train(resume=True), ValueError,
     "needs the save_dir"),
    # (also where older runs kept it)
    ("train: resume a crafted checkpoint", lambda e, t: resume_with(t, lambda p: [
        torch.save({"trainers": [RunsCode(t / "pwned")], "trainer": RunsCode(t / "pwned"),
                    "step": 1}, path)
        for path in (p, t / "trainer_0" / "checkpoint.pt")]), ValueError, "could run code"),
    ("train: resume a truncated checkpoint", lambda e, t: resume_with(t, truncate), ValueError,
     "cannot load checkpoint"),
    ("train: resume an empty checkpoint", lambda e, t: resume_with(t, lambda p: p.write_bytes(b"")),
     ValueError, "cannot load checkpoint"),
    ("train: resume with another dict_size",
     lambda e, t: resume_with(t, configs=[config(dict_size=64)]), ValueError,
     "dict_size: 32 in the checkpoint, 64 now"),
    ("train: resume with another lr", lambda e, t: resume_with(t, configs=[config(lr=5e-2)]),
     ValueError, "lr: 0.001 in the checkpoint, 0.05 now"),
    ("train: resume with one trainer more",
     lambda e, t: resume_with(t, configs=[config(), config(seed=1)]), ValueError,
     "holds 1 trainers, this run has 2"),
    # ---------------------------------------------------------------- load_dictionary
    ("load: missing folder", lambda e, t: load_dictionary(t / "nope"), ValueError,
     "expected a folder with config"),
    ("load: a file, not a folder", lambda e, t: load_dictionary(e.root / "topk" / "ae.pt"),
     ValueError, "expected a folder"),
    ("load: no config.json", lambda e, t: (copy_saved(e, t).joinpath("config.json").unlink(),
                                           load_dictionary(t / "topk")), ValueError,
     "expected a folder with config"),
    ("load: truncated config.json", lambda e, t: (truncate(copy_saved(e, t) / "config.json"),
                                                  load_dictionary(t / "topk")), ValueError,
     "config.json' is not a valid JSON file"),
    ("load: empty config.json",
     lambda e, t: (copy_saved(e, t).joinpath("config.json").write_text(""),
                   load_dictionary(t / "topk")), ValueError,
     "not a valid JSON file"),
    ("load: binary config.json",
     lambda e, t: (copy_saved(e, t).joinpath("config.json").write_bytes(b"\xbe\x00\xff"),
                   load_dictionary(t / "topk")), ValueError,
     "not a valid JSON file"),
    ("load: config.json holds a list",
     lambda e, t: (copy_saved(e, t).joinpath("config.json").write_text("[1]"),
                   load_dictionary(t / "topk")), ValueError,
     "must hold a JSON object, got a list"),
    ("load: no dict_class",
     lambda e, t: (edit_json(copy_saved(e, t) / "config.json", lambda c: {"trainer": {}}),
                                          load_dictionary(t / "topk")), ValueError,
     "dict_class None"),
    ("load: ae.pt truncated",
     lambda e, t: (truncate(copy_saved(e, t) / "ae.pt"), load_dictionary(t / "topk")), ValueError,
     "cannot read weights from .*ae.pt"),
    ("load: ae.pt empty", lambda e, t: (copy_saved(e, t).joinpath("ae.pt").write_bytes(b""),
                                        load_dictionary(t / "topk")), ValueError,
     "cannot read weights"),
    ("load: safetensors truncated, no ae.pt",
     lambda e, t: (copy_saved(e, t).joinpath("ae.pt").unlink(),
                   truncate(t / "topk" / "model.safetensors"), load_dictionary(t / "topk")),
     ValueError, "cannot read weights from .*model.safetensors"),
    ("load: no weights", lambda e, t: (copy_saved(e, t).joinpath("ae.pt").unlink(),
                                       (t / "topk" / "model.safetensors").unlink(),
                                       load_dictionary(t / "topk")),
     ValueError, "holds no ae.pt"),
    ("load: config and weights disagree", lambda e, t: (
        edit_json(copy_saved(e, t) / "config.json",
                  lambda c: {**c, "trainer": {**c["trainer"], "dict_size": 128}}),
        load_dictionary(t / "topk")), ValueError, "dict_size=128 but the weights hold "
                                                  "dict_size=32"),
    ("load: ae.pt without k", lambda e, t: (
        torch.save({k: v for k, v in torch.load(copy_saved(e, t) / "ae.pt").items() if k != "k"},
                   t / "topk" / "ae.pt"),
        load_dictionary(t / "topk")), ValueError, "lack 'k'"),
    ("load: a crafted ae.pt",
     lambda e, t: (torch.save({"x": RunsCode(t / "pwned")}, copy_saved(e, t) / "ae.pt"),
                                            load_dictionary(t / "topk")), ValueError, "could run "
                                                                                      "code"),
    ("load: NaN weights", lambda e, t: (
        torch.save({k: v.fill_(math.nan) if v.is_floating_point() else v
                    for k, v in torch.load(copy_saved(e, t) / "ae.pt").items()},
                   t / "topk" / "ae.pt"),
        load_dictionary(t / "topk")), UserWarning, "NaN / inf"),
    ("load: integer dtype", lambda e, t: load_dictionary(e.root / "topk", dtype=torch.int32),
     TypeError, "floating point"),
    # ---------------------------------------------------------------- SCAE
    ("scae: a square SAE in an mlp slot",
     lambda e, t: SCAESuite(suite_with(e, mlp_1=AutoEncoderTopK(64, 96, 8))), ValueError,
     "mlp_1: MLP modules are transcoders"),
    ("scae: C 0", lambda e, t: select_connections(e.suite, e.eager, TEXTS, 0), ValueError,
     "C must be a positive int, got 0"),
    ("scae: C -3", lambda e, t: select_connections(e.suite, e.eager, TEXTS, -3), ValueError,
     "got -3"),
    ("scae: C 2.5", lambda e, t: select_connections(e.suite, e.eager, TEXTS, 2.5), ValueError,
     "got 2.5"),
    ("scae: C True", lambda e, t: select_connections(e.suite, e.eager, TEXTS, True), ValueError,
     "got True"),
    ("scae: no texts", lambda e, t: select_connections(e.suite, e.eager, [], 4), ValueError,
     "at least one text"),
    ("scae: texts None", lambda e, t: select_connections(e.suite, e.eager, None, 4), TypeError,
     "texts must be an iterable of texts"),
    ("scae: texts a bare string", lambda e, t: select_connections(e.suite, e.eager, "a text", 4),
     TypeError, "single string"),
    ("scae: texts of ints", lambda e, t: select_connections(e.suite, e.eager, [1, 2], 4), TypeError,
     "texts must yield strings, got int"),
    ("scae: no eager attention",
     lambda e, t: select_connections(e.suite, e.model, TEXTS, 4, ctx_len=CTX), ValueError, "eager"),
    ("scae: suite narrower than the model",
     lambda e, t: select_connections(_narrow_suite(), e.eager, TEXTS, 4), ValueError,
     "maps 32 -> 32, but the model's width is 64"),
    ("scae: more layers than the model",
     lambda e, t: SCAESuite.random(e.eager, 32, 4, n_layer=5).check_model(e.eager), ValueError,
     "the suite has 5 layers, the model 4"),
    ("scae: a layer's transcoder missing",
     lambda e, t: SCAESuite({n: m for n, m in suite_with(e).items()
                                                                   if n != "mlp_1"}),
     ValueError, "needs an attention SAE and a transcoder on every layer"),
    ("scae: module name attn_x", lambda e, t: SCAESuite({"attn_x": AutoEncoderTopK(64, 96, 8)}),
     ValueError, "SCAE module names are"),
    ("scae: module name mlp0", lambda e, t: SCAESuite({"mlp0": AutoEncoderTopK(64, 96, 8)}),
     ValueError, "SCAE module names are"),
    ("scae: a ReLU autoencoder", lambda e, t: SCAESuite(suite_with(e, attn_0=AutoEncoder(64, 96))),
     TypeError, "SCAE modules are AutoEncoderTopK dictionaries .*got AutoEncoder"),
    ("scae: attention transcoder", lambda e, t: SCAESuite(suite_with(
        e, attn_0=AutoEncoderTopK(64, 96, 8, transcoder=True))), ValueError,
     "attention modules are SAEs"),
    ("scae: empty suite", lambda e, t: SCAESuite({}), ValueError, "at least one module"),
    ("scae: index out of range", lambda e, t: connections_with(
        e, "mlp_1", indices=mlp1_indices(e).clone().fill_(288)).validate(e.suite), ValueError,
     r"indices must lie in \[0, 288\)"),
    ("scae: negative index", lambda e, t: connections_with(
        e, "mlp_1", indices=mlp1_indices(e).clone().fill_(-1)).validate(e.suite), ValueError,
     "must lie in"),
    ("scae: duplicate index", lambda e, t: connections_with(
        e, "mlp_1", indices=mlp1_indices(e).clone().fill_(3)).validate(e.suite), ValueError,
     "same source feature"),
    ("scae: a module without connections",
     lambda e, t: connections_with(e, "attn_1", drop=True).validate(e.suite), ValueError,
     "no connections for module attn_1"),
    ("scae: a module without weights",
     lambda e, t: connections_with(e, "mlp_1", drop_weights=True).validate(e.suite), ValueError,
     "no connection weights for module mlp_1"),
    ("scae: weights of the wrong shape", lambda e, t: connections_with(
        e, "mlp_1", weights=torch.zeros(96, 2)).validate(e.suite), ValueError,
     "do not match indices"),
    ("scae: float indices", lambda e, t: connections_with(
        e, "mlp_1", indices=mlp1_indices(e).float()).validate(e.suite), TypeError, "int64"),
    ("scae: train steps 0", lambda e, t: train_scae_suite(make_suite(e.eager, 2), e.eager, TEXTS,
                                                          all_connections(e.suite, e.eager), 0),
     ValueError, "steps must be a positive int"),
    ("scae: train both weights 0", lambda e, t: train_scae_suite(
        make_suite(e.eager, 2), e.eager, TEXTS, all_connections(e.suite, e.eager), 2, mse_weight=0,
        ce_weight=0),
     ValueError, "must not all be 0"),
    ("scae: train batch_texts 0", lambda e, t: train_scae_suite(
        make_suite(e.eager, 2), e.eager, TEXTS, all_connections(e.suite, e.eager), 2,
        batch_texts=0), ValueError,
     "batch_texts must be a positive int, got 0"),
    ("scae: train batch_texts -1", lambda e, t: train_scae_suite(
        make_suite(e.eager, 2), e.eager, TEXTS, all_connections(e.suite, e.eager), 2,
        batch_texts=-1), ValueError,
     "batch_texts must be a positive int, got -1"),
    ("scae: train texts of ints", lambda e, t: train_scae_suite(
        make_suite(e.eager, 2), e.eager, [1, 2, 3], all_connections(e.suite, e.eager), 2,
        ctx_len=CTX,
        progress=False), TypeError, "texts must yield strings"),
    ("scae: train texts run out", lambda e, t: train_scae_suite(
        make_suite(e.eager, 2), e.eager, TEXTS[:4], all_connections(e.suite, e.eager), 10,
        batch_texts=2,
        ctx_len=CTX, progress=False), UserWarning, r"data ran out after 2 steps \(of 10\)"),
    ("scae: ce_versus_c no Cs", lambda e, t: ce_versus_c(e.suite, e.eager, TEXTS, TEXTS, []),
     ValueError, "at least one C"),
    ("scae: ce_versus_c C 0", lambda e, t: ce_versus_c(e.suite, e.eager, TEXTS, TEXTS, [0, 4]),
     ValueError, "C must be a positive int, got 0"),
    ("scae: load a missing folder", lambda e, t: SCAESuite.load(t / "none"), ValueError,
     "no suite.json"),
    ("scae: load a corrupt suite.json",
     lambda e, t: (truncate(copy_saved(e, t, "suite") / "suite.json"), SCAESuite.load(t / "suite")),
     ValueError, "suite.json' is not a valid JSON file"),
    ("scae: load suite.json without modules", lambda e, t: (
        copy_saved(e, t, "suite").joinpath("suite.json").write_text("{}"),
        SCAESuite.load(t / "suite")), ValueError,
     "'modules' must list the module names"),
    ("scae: load with a module folder deleted", lambda e, t: (
        __import__("shutil").rmtree(copy_saved(e, t, "suite") / "mlp_1"),
        SCAESuite.load(t / "suite")), ValueError,
     "expected a folder with config.json"),
    ("scae: load truncated connections", lambda e, t: (
        truncate(copy_saved(e, t, "suite") / "connections.safetensors"),
        SCAESuite.load(t / "suite")), ValueError,
     "cannot read connections"),
    ("scae: load connections missing", lambda e, t: (
        copy_saved(e, t, "suite").joinpath("connections.safetensors").unlink(),
        SCAESuite.load(t / "suite")),
     ValueError, "connections.safetensors is missing"),
    ("scae: load a module from another suite", lambda e, t: (
        save_dictionary(AutoEncoderTopK(64, 48, 8, transcoder=True),
                        copy_saved(e, t, "suite") / "mlp_0"),
        SCAESuite.load(t / "suite")), ValueError, "not a consistent SCAESuite"),
    # ---------------------------------------------------------------- command line
    ("cli: train --tokens 0", lambda e, t: cli("train", "--tokens", "0"), SystemExit, "2"),
    ("cli: train --tokens -5", lambda e, t: cli("train", "--tokens", "-5"), SystemExit, "2"),
    ("cli: train --ctx-len 0", lambda e, t: cli("train", "--ctx-len", "0"), SystemExit, "2"),
    ("cli: train --batch 0", lambda e, t: cli("train", "--batch", "0"), SystemExit, "2"),
    ("cli: train --eval-texts 0", lambda e, t: cli("train", "--eval-texts", "0"), SystemExit, "2"),
    ("cli: collect --tokens 0", lambda e, t: cli("collect", "--tokens", "0"), SystemExit, "2"),
    ("cli: collect --ctx-len 0", lambda e, t: cli("collect", "--ctx-len", "0"), SystemExit, "2"),
    ("cli: collect --layer abc", lambda e, t: cli("collect", "--layer", "abc"), SystemExit, "2"),
    ("cli: collect --site bogus", lambda e, t: cli("collect", "--site", "bogus"), SystemExit, "2"),
    ("cli: scae --selection-texts 0",
     lambda e, t: cli("scae", "--suite", "x", "--selection-texts", "0"), SystemExit, "2"),
    ("cli: train --batch above --tokens",
     lambda e, t: cli("train", "--model", "tiny-llama", "--tokens", "500", "--batch", "2048"),
     ValueError, "batch=2048 exceeds tokens=500"),
    ("cli: train --k above --dict-size",
     lambda e, t: cli("train", "--k", "50", "--dict-size", "40"), ValueError,
     r"k must be an int in \[1, d_sae=40\], got 50"),
    ("cli: train --out is a file", lambda e, t: (t.joinpath("afile").write_text("x"),
                                                 cli("train", "--out", str(t / "afile"))),
     NotADirectoryError, "out must be a folder, but .*afile' is a file"),
    ("cli: collect --layer 99",
     lambda e, t: cli("collect", "--model", "tiny-llama", "--layer", "99", "--tokens", "10"),
     ValueError, "layer must be an int in"),
    ("cli: collect --model unknown", lambda e, t: cli("collect", "--model", "no-such-model"),
     ValueError, "cannot load model 'no-such-model'"),
    ("cli: collect --data missing",
     lambda e, t: cli("collect", "--model", "tiny-llama", "--data", str(t / "none")),
     (ValueError, FileNotFoundError), "none"),
    ("cli: scae --suite missing", lambda e, t: cli("scae", "--suite", str(t / "none")), ValueError,
     "no suite.json"),
    ("cli: scae --Cs a,b",
     lambda e, t: cli("scae", "--suite", str(e.root / "suite"), "--Cs", "a,b"), ValueError,
     "--Cs must be comma-separated integers"),
]


def _narrow_suite():
    torch.manual_seed(0)
    return SCAESuite({name: AutoEncoderTopK(32, 48, 4, transcoder=name.startswith("mlp"))
                      for name in ("attn_0", "mlp_0")})


@pytest.mark.parametrize("name, run, error, message", CASES, ids=[case[0] for case in CASES])
def test_bad_input_gets_a_clear_error(env, tmp_path, name, run, error, message):
    """The error's type and a message naming what was expected and what came (warnings for what may
    be meant)."""
    if isinstance(error, type) and issubclass(error, Warning):
        with pytest.warns(error, match=message):
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                run(env, tmp_path)
        return
    with pytest.raises(error, match=message if error is not SystemExit else None) as raised:
        run(env, tmp_path)
    if error is SystemExit:  # argparse: a usage error (exit code 2) naming the option
        assert raised.value.code == 2
    assert not (tmp_path / "pwned").exists(), "a crafted file ran code"
    assert not (tmp_path / "run" / "trainer_0" / "ae.pt").exists(), ("a failed run saved a "
                                                                     "dictionary")


def test_cli_usage_errors_name_the_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--tokens", "0"])
    assert "argument --tokens: expected a positive integer, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# valid edge inputs: a correct result, not an error


def test_integral_numbers_of_any_kind_are_accepted():
    a = AutoEncoderTopK(np.int64(D), np.int64(DICT), np.int64(K))
    b = AutoEncoderTopK(D, DICT, torch.tensor(K))
    assert (a.activation_dim, a.dict_size, int(a.k), int(b.k)) == (D, DICT, K, K)
    assert isinstance(a.dict_size, int) and a.encoder.weight.shape == (DICT, D)


def test_edge_batches_give_correct_results():
    sae = AutoEncoderTopK(D, DICT, K)
    assert sae(torch.zeros(0, D)).shape == (0, D)
    assert sae(torch.randn(D)).shape == (D,)
    # NaN propagates, never a finite guess
    assert torch.isnan(sae(torch.full((2, D), math.nan))).all()


def test_upstream_float_buffer_sizes_are_accepted(env):
    """Upstream's README passes n_ctxs=3e4: an integral float is a count."""
    assert buffer(env, n_ctxs=4.0).n_ctxs == 4


def test_a_later_save_replaces_the_folder_as_a_whole(tmp_path):
    """A save over an older one leaves no file of the old (a smaller dictionary leaves no larger
    weights behind); entries that are not the dictionary's (upstream's checkpoints/) stay."""
    save_dictionary(AutoEncoderTopK(D, 64, K), tmp_path / "d")
    (tmp_path / "d" / "checkpoints").mkdir()
    (tmp_path / "d" / "checkpoints" / "ae_5.pt").write_bytes(b"kept")
    (tmp_path / "d" / "notes.txt").write_text("kept")
    save_dictionary(AutoEncoderTopK(D, DICT, K), tmp_path / "d")
    dictionary, config = load_dictionary(tmp_path / "d")
    assert dictionary.dict_size == DICT and config["trainer"]["dict_size"] == DICT
    assert (tmp_path / "d" / "checkpoints" / "ae_5.pt").read_bytes() == b"kept"
    assert (tmp_path / "d" / "notes.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["d"], "no staging folder is left behind"


def full_disk_at(n, function):
    """`function`, except that its n-th call fails as a full disk would."""
    calls = [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == n:
            raise OSError(28, "No space left on device (simulated)")
        return function(*args)

    return failing


@pytest.mark.parametrize("exchange", [True, False])
def test_a_failed_save_leaves_the_old_folder_whole(tmp_path, monkeypatch, exchange):
    """The reliability sweep's worst silent case: a save over an existing folder fails half-way
    (here at its second file; also without the atomic exchange, on the two-rename path). The old
    save must load unchanged, not a mix."""
    from dictionary_learning import files

    save_dictionary(AutoEncoderTopK(D, 64, K), tmp_path / "d")
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", full_disk_at(2, real_replace))
    with pytest.raises(OSError, match="No space"):
        save_dictionary(AutoEncoderTopK(D, DICT, K), tmp_path / "d")
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    assert load_dictionary(tmp_path / "d")[0].dict_size == 64
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    save_dictionary(AutoEncoderTopK(D, DICT, K), tmp_path / "d")  # and the next save goes through
    assert load_dictionary(tmp_path / "d")[0].dict_size == DICT


def test_a_failed_suite_save_leaves_the_old_suite_whole(env, tmp_path, monkeypatch):
    """SCAESuite.save over an existing suite failing at its third module: the old suite loads, all
    of it."""
    import dictionary_learning.scae.suite as suite_module

    env.suite.save(tmp_path / "s")
    other = make_suite(env.eager, n_layer=2, seed=7)
    monkeypatch.setattr(suite_module, "save_dictionary",
                        full_disk_at(3, suite_module.save_dictionary))
    with pytest.raises(OSError, match="No space"):
        other.save(tmp_path / "s")
    loaded = SCAESuite.load(tmp_path / "s")
    for name in env.suite.names:
        for key, value in env.suite[name].state_dict().items():
            assert torch.equal(loaded[name].state_dict()[key], value), (f"{name}.{key} is not the "
                                                                        "old suite's")


def test_stale_temporaries_of_killed_processes_are_removed(tmp_path):
    """A kill -9 leaves `.name.<pid>.tmp` files and `.name.<pid>.new` folders; the next write of
    that name removes those of processes that no longer run, and keeps a live process's."""
    import subprocess
    import sys

    from dictionary_learning.files import atomic_write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".notes.txt.{pid}.tmp").write_text("stale")
    (tmp_path / f".notes.txt.{os.getppid()}.tmp").write_text("a live process's")
    (tmp_path / f".d.{pid}.new").mkdir()
    atomic_write_text(tmp_path / "notes.txt", "new")
    save_dictionary(AutoEncoderTopK(D, DICT, K), tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", "d",
                                                                 f".notes.txt.{os.getppid()}.tmp"])


def test_quickstart_evaluates_on_few_held_out_texts(tmp_path):
    """--eval-texts at or below --batch-texts used to end in KeyError 'ce_clean' after training."""
    metrics = main(["train", "--model", "tiny-llama", "--tokens", "400", "--steps", "3", "--batch",
                    "64", "--dict-size", "64", "--k", "4", "--eval-texts", "8", "--eval-tokens",
                    "128", "--ctx-len", "32", "--loss-batches", "1", "--n-features", "1", "--out",
                    str(tmp_path / "q")])
    assert metrics["ce_clean"] > 0 and math.isfinite(metrics["ce_patched"])


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (skipped where mounting needs privileges this process lacks)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_and_a_read_only_one(small_disk):
    """A real full disk: a clear OSError naming the file, nothing half-written; once there is room,
    resuming finishes as an uninterrupted run does. A read-only disk: refused before any training,
    the earlier save intact."""
    import subprocess

    big = dict(config(20, dict_size=1024), activation_dim=64)
    features = planted_features(64, 64, seed=0)
    with pytest.raises(OSError, match=r"writing '.*checkpoint.pt' failed \(0 MB free on its disk; "
                                      r"full or read-only"):
        trainSAE(planted_stream(features, 2, 32, 20, seed=1), [big], 20,
                 save_dir=small_disk / "run", checkpoint_steps=5, progress=False)
    assert not [p for p in (small_disk / "run").rglob("*") if p.is_file()], ("a partial file "
                                                                             "was left")
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    [resumed] = trainSAE(planted_stream(features, 2, 32, 20, seed=1), [big], 20,
                         save_dir=small_disk / "run", checkpoint_steps=5, resume=True,
                         progress=False)
    [straight] = trainSAE(planted_stream(features, 2, 32, 20, seed=1), [big], 20, progress=False)
    for key, value in straight.ae.state_dict().items():
        assert torch.equal(resumed.ae.state_dict()[key], value), key
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(PermissionError, match="save_dir .* cannot be written: .* is not writable"):
        no_training(small_disk, configs=[big], save_dir=small_disk / "run")
    assert load_dictionary(small_disk / "run" / "trainer_0")[0].dict_size == 1024


def test_training_casts_batches_of_another_dtype():
    """Training batches in bfloat16 (a bfloat16 model's buffer) train a float32 trainer, as before:
    only direct calls of a dictionary refuse another dtype."""
    [trainer] = train(data=(batch.bfloat16() for batch in stream()))
    assert next(trainer.ae.parameters()).dtype == torch.float32 and trainer.last_metrics["l0"] > 0

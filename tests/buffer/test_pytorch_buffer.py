"""pytorch_buffer (upstream HEAD's nnsight-free buffer) against plain forward hooks and against this
toolkit's nnsight ActivationBuffer on the same texts."""

import inspect
import json
import subprocess
import sys

import pytest
import torch

from dictionary_learning import buffer as nnsight_buffer
from dictionary_learning.models import HookPoint
from dictionary_learning.pytorch_buffer import (
    ActivationBuffer,
    EarlyStopException,
    collect_activations,
)

from ..compat.test_buffer_upstream import UPSTREAM_ACTIVATION_BUFFER, parameters
from ..helpers import assert_same_rows, hook_reference, random_texts

CTX = 32


def drain(buffer):
    return torch.cat(list(buffer))


def test_signatures_are_upstreams():
    assert parameters(ActivationBuffer)[:13] == UPSTREAM_ACTIVATION_BUFFER
    assert parameters(collect_activations)[:4] == [("model", inspect.Parameter.empty),
                                                   ("submodule", inspect.Parameter.empty),
                                                   ("inputs_BL", inspect.Parameter.empty),
                                                   ("use_no_grad", True)]
    assert issubclass(EarlyStopException, Exception)
    for name in ("text_batch", "tokenized_batch", "refresh", "config", "close", "activations",
                 "read"):
        assert hasattr(ActivationBuffer, name), name


def test_nnsight_is_not_imported():
    code = ("import sys, dictionary_learning.pytorch_buffer; "
            "assert 'nnsight' not in sys.modules, 'nnsight imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_collect_activations(tiny_llama):
    """The module's output (or input) as an independent forward hook records it; the pass stops
    after the module."""
    hf_model = tiny_llama._module
    layer = hf_model.model.layers[1]
    inputs = tiny_llama.tokenizer(["a small river", "an old stone bridge near the city"],
                                  return_tensors="pt", padding=True)
    seen, later_calls = {}, []
    handles = [layer.register_forward_hook(lambda m, args, out:
                                           seen.update(out=out[0] if isinstance(out, tuple)
                                                       else out)),
               layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(inp=(args or
                                               tuple(kwargs.values()))[0]), with_kwargs=True),
               hf_model.model.layers[2].register_forward_hook(lambda *a: later_calls.append(1)),
               hf_model.lm_head.register_forward_hook(lambda *a: later_calls.append(1))]
    try:
        out = collect_activations(hf_model, layer, dict(inputs))
        assert not later_calls, "the forward pass ran past the hooked module"
        torch.testing.assert_close(out, seen["out"], rtol=0, atol=0)
        assert out.shape == (2, inputs["input_ids"].shape[1], 64) and not out.requires_grad
        inp = collect_activations(hf_model, layer, dict(inputs), io="in")
        torch.testing.assert_close(inp, seen["inp"], rtol=0, atol=0)
        with_grad = collect_activations(hf_model, layer, dict(inputs), use_no_grad=False)
        assert with_grad.requires_grad
        with_grad.sum().backward()
        assert hf_model.model.layers[0].mlp.up_proj.weight.grad is not None
    finally:
        hf_model.zero_grad(set_to_none=True)
        for handle in handles:
            handle.remove()
    with pytest.raises(RuntimeError, match="never reached"):
        collect_activations(hf_model, torch.nn.Linear(2, 2), dict(inputs))


@pytest.mark.parametrize("name,path,options", [
    ("tiny-llama", "model.layers.1", {}),
    ("tiny-llama", "model.layers.2.mlp", dict(io="in", remove_bos=True)),
    # learned positions: left padding must not shift them
    ("tiny-gpt2", "transformer.h.1", dict(remove_bos=True)),
    ("tiny-gpt2", "transformer.h.2.mlp", dict(max_activation_norm_multiple=1.2)),
])
def test_same_vectors_as_hooks_and_nnsight_buffer(name, path, options, request):
    """On the same texts the PyTorch buffer serves the plain forward hook's vectors, and exactly the
    nnsight buffer's batches (same seed: same order)."""
    model = request.getfixturevalue(name.replace("-", "_"))
    texts = random_texts(9, seed=21, max_words=8)  # many shorter than CTX: padded batches
    shape = dict(n_ctxs=3, ctx_len=CTX, refresh_batch_size=4, out_batch_size=37, seed=7)
    ours = ActivationBuffer(iter(texts), model._module, model._module.get_submodule(path), **shape,
                            **options, tokenizer=model.tokenizer)
    got = drain(ours)
    io = "input" if options.get("io") == "in" else "output"
    reference = nnsight_buffer.ActivationBuffer(iter(texts), model, HookPoint(path, io), **shape,
                                                **{k: v for k, v in options.items() if k != "io"})
    torch.testing.assert_close(got, drain(reference), atol=1e-5, rtol=1e-5)
    if "max_activation_norm_multiple" not in options:
        expected = hook_reference(model, texts, [HookPoint(path, io)], CTX,
                                  drop_first=options.get("remove_bos", False))
        assert_same_rows(got, expected[0])
    else:
        assert got.shape[0] < sum(len(model.tokenizer(t, truncation=True,
                                                      max_length=CTX)["input_ids"])
                                  for t in texts)


def test_upstream_end_to_end_form(tiny_llama, tmp_path):
    """Upstream's test construction: a model from `from_pretrained`, its tokenizer found through
    `name_or_path`, the buffer fed to trainSAE with upstream's trainer configs and saved as
    upstream's config.json `buffer`."""
    from transformers import AutoModelForCausalLM

    from dictionary_learning.dictionary import AutoEncoderTopK
    from dictionary_learning.trainers.top_k import TopKTrainer
    from dictionary_learning.training import trainSAE

    tiny_llama._module.save_pretrained(tmp_path / "model")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    texts = random_texts(30, seed=22)
    submodule = model.model.layers[1]
    activation_dim = model.config.hidden_size
    buffer = ActivationBuffer(iter(texts), model, submodule, n_ctxs=4, ctx_len=CTX,
                              refresh_batch_size=8, out_batch_size=64, io="out",
                              d_submodule=activation_dim, device="cpu")
    got = drain(ActivationBuffer(iter(texts), model, submodule, n_ctxs=4, ctx_len=CTX,
                                 refresh_batch_size=8))
    assert_same_rows(got, hook_reference(tiny_llama, texts, [HookPoint("model.layers.1", "output")],
                                         CTX)[0])
    config = {"trainer": TopKTrainer, "dict_class": AutoEncoderTopK, "lr": None,
              "activation_dim": activation_dim, "dict_size": 4 * activation_dim, "k": 8,
              "auxk_alpha": 1 / 32, "warmup_steps": 0, "decay_start": None, "steps": 3, "seed": 42,
              "wandb_name": "TopKTrainer-tiny", "device": "cpu", "layer": 1,
              "lm_name": "tiny-llama",
              "submodule_name": "resid_post_layer_1"}
    trainSAE(data=buffer, trainer_configs=[config], steps=3, save_dir=str(tmp_path / "sae"))
    saved = json.loads(next((tmp_path / "sae").rglob("config.json")).read_text())
    assert saved["buffer"]["ctx_len"] == CTX and saved["buffer"]["d_submodule"] == activation_dim


def test_buffer_api_and_errors(tiny_gpt2):
    texts = random_texts(20, seed=23, min_words=10)
    hf_model = tiny_gpt2._module
    buffer = ActivationBuffer(iter(texts), tiny_gpt2, "transformer.h.0", n_ctxs=2, ctx_len=CTX,
                              refresh_batch_size=2,
                              # an nnsight-wrapped model and a dotted path work too
                              out_batch_size=20)
    assert buffer.activations.shape == (0, 48) and buffer.activation_buffer_size == 2 * CTX
    batch = next(buffer)
    assert int(buffer.read.sum()) == 20
    assert_same_rows(buffer.activations[buffer.read], batch, atol=1e-6)
    buffer.refresh()
    assert not buffer.read.any() and buffer.activations.shape[0] >= 2 * CTX
    assert json.loads(json.dumps(buffer.config))["d_submodule"] == 48
    buffer.close()
    with pytest.raises(StopIteration):
        next(buffer)
    layer = hf_model.transformer.h[0]
    for kwargs, error, match in [
        (dict(d_submodule=47), ValueError, "has width 48"),
        (dict(io="in_to_out"), ValueError, "io must be"),
        (dict(n_ctxs=0), ValueError, "n_ctxs"),
        (dict(ctx_len=1000), ValueError, "maximum context of 256"),
        (dict(data=[]), ValueError, "no text"),
        (dict(data=[1]), TypeError, "strings"),
    ]:
        arguments = dict(data=texts, model=hf_model, submodule=layer,
                         tokenizer=tiny_gpt2.tokenizer) | kwargs
        with pytest.raises(error, match=match):
            ActivationBuffer(**arguments)

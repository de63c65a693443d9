"""SCAE traces: the suite patched into the model against plain PyTorch forward hooks."""

import torch

from dictionary_learning.models import get_adapter
from dictionary_learning.scae import run_suite

from ..helpers import CTX, make_suite, random_texts


def test_run_suite_patches_every_module(eager_model):
    """The logits equal a plain PyTorch run whose forward hooks replace each attention output and
    MLP output by the suite's reconstructions, each text run alone."""
    suite = make_suite(eager_model)
    texts = random_texts(3, seed=20, max_words=8)
    record, logits = run_suite(suite, eager_model, texts, ctx_len=CTX)
    adapter, torch_model = get_adapter(eager_model), eager_model._module
    handles = []
    for layer in range(suite.n_layers):
        attn = torch_model.get_submodule(f"{adapter.block(layer)}.{adapter.attn}")
        mlp = torch_model.get_submodule(f"{adapter.block(layer)}.{adapter.mlp}")
        sae, transcoder = suite[f"attn_{layer}"], suite[f"mlp_{layer}"]
        handles.append(attn.register_forward_hook(lambda m, a, out, sae=sae:
                                                  (sae(out[0]), *out[1:])))
        handles.append(mlp.register_forward_hook(lambda m, a, out, t=transcoder: t(a[0])))
    try:
        with torch.no_grad():
            for row, text in enumerate(texts):
                ids = eager_model.tokenizer(text, return_tensors="pt", truncation=True,
                                            max_length=CTX)["input_ids"]
                expected = torch_model(ids).logits[0]
                got = logits[row][record.mask[row]]
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        for handle in handles:
            handle.remove()

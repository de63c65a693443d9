"""End-to-end training (training.EndToEnd, trainSAE(end_to_end=...)): the downstream gradient
against a plain PyTorch forward-hook reference, the model untouched, KL lowered against the
local-MSE start, exact resume, clear errors."""

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning import ActivationBuffer, hook
from dictionary_learning.evaluation import patched_losses
from dictionary_learning.models import torch_model
from dictionary_learning.tracing import model_inputs, tokenize
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import EndToEnd, build_trainer, trainSAE
from dictionary_learning.utils import load_dictionary

from ..helpers import Crash, crashing, random_texts

CTX = 24


def topk_config(steps, **extra):
    return {**dict(trainer=TopKTrainer, activation_dim=64, dict_size=256, k=8, steps=steps,
                   warmup_steps=1, lr=1e-3, seed=0), **extra}


def text_batches(texts, size):
    for start in range(0, len(texts) - size + 1, size):
        yield texts[start:start + size]


@pytest.mark.parametrize("site", ["resid", "transcoder"])
def test_downstream_gradient_matches_a_forward_hook_reference(tiny_llama, site):
    texts = random_texts(6, seed=31)
    if site == "transcoder":
        hooks = (hook(tiny_llama, 1, "mlp_in"), hook(tiny_llama, 1, "mlp_out"))
        trainer = build_trainer(topk_config(10, transcoder=True))
    else:
        hooks = (hook(tiny_llama, 1, "resid"),)
        trainer = build_trainer(topk_config(10))
    end_to_end = EndToEnd(trainer, tiny_llama, hooks, kl_weight=1.0, ce_weight=0.5,
                          remove_bos=False, ctx_len=CTX)
    torch_model(tiny_llama).zero_grad(set_to_none=True)
    loss, _ = end_to_end.downstream_loss(texts)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in trainer.ae.named_parameters() if p.grad is not None}
    # nothing reaches the model
    assert all(p.grad is None for p in torch_model(tiny_llama).parameters())
    # and it is left as it was
    assert all(p.requires_grad for p in torch_model(tiny_llama).parameters())

    # reference: the same batch through the plain torch model, the dictionary applied by a forward
    # hook
    reference = build_trainer(topk_config(10, transcoder=site == "transcoder")).ae
    reference.load_state_dict(trainer.ae.state_dict())
    model = torch_model(tiny_llama)
    encoding = tokenize(tiny_llama.tokenizer, texts, CTX)
    inputs, mask = model_inputs(encoding), encoding["attention_mask"].bool()
    with torch.no_grad():
        clean = model(**inputs).logits.float()
    target_module = model.get_submodule(hooks[-1].path)
    source_module = model.get_submodule(hooks[0].path)
    seen = {}

    def keep_input(module, args):
        seen["x"] = args[0]

    def replace(module, args, out):
        value = out[0] if isinstance(out, tuple) else out
        source = seen["x"] if site == "transcoder" else value
        new = reference(source.reshape(-1, 64)).reshape(value.shape)
        new = torch.where(mask[..., None], new, value)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handles = [target_module.register_forward_hook(replace)]
    if site == "transcoder":
        handles.append(source_module.register_forward_pre_hook(keep_input))
    try:
        patched = model(**inputs).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    kl = ((F.softmax(clean, -1) * (F.log_softmax(clean, -1) - F.log_softmax(patched, -1)))
          .sum(-1)[mask].mean())
    ids = encoding["input_ids"]
    pairs = (mask[:, 1:] & mask[:, :-1]).flatten()
    ce = F.cross_entropy(patched[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                         reduction="none")[pairs].mean()
    (kl + 0.5 * ce).backward()
    # the reference's gradients reached the model: leave the shared model clean
    model.zero_grad(set_to_none=True)
    assert loss.item() == pytest.approx((kl + 0.5 * ce).item(), rel=1e-4)
    for name, parameter in reference.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(ours[name], parameter.grad, rtol=1e-3, atol=1e-6, msg=name)
    assert ours["encoder.weight"].abs().sum() > 0


def test_end_to_end_lowers_kl_against_its_local_start(tmp_path, tiny_llama):
    point = hook(tiny_llama, 1, "resid")
    buffer = ActivationBuffer(iter(random_texts(200, seed=32)), tiny_llama, point, n_ctxs=32,
                              ctx_len=CTX, refresh_batch_size=8, out_batch_size=128)
    trainSAE(buffer, [topk_config(30)], 30, save_dir=tmp_path / "local", progress=False)
    held_out = random_texts(24, seed=33)
    local, _ = load_dictionary(tmp_path / "local" / "trainer_0")
    before = patched_losses(held_out, tiny_llama, local, (point,), ctx_len=CTX)
    texts = random_texts(240, seed=34)
    trainers = trainSAE(text_batches(texts, 8),
                        [topk_config(30, initial_weights=str(tmp_path / "local" / "trainer_0"))],
                        30, save_dir=tmp_path / "e2e", progress=False,
                        end_to_end={"model": tiny_llama, "hooks": (point,), "kl_weight": 1.0,
                                    "ctx_len": CTX})
    tuned, config = load_dictionary(tmp_path / "e2e" / "trainer_0")
    after = patched_losses(held_out, tiny_llama, tuned, (point,), ctx_len=CTX)
    assert after["kl_patched"] < 0.8 * before["kl_patched"], (before, after)
    assert config["trainer"]["end_to_end"]["kl_weight"] == 1.0
    assert config["trainer"]["initial_weights"].endswith("trainer_0")
    assert "kl" in trainers[0].last_metrics


@pytest.mark.parametrize("normalize_local", [True, False])
def test_local_term_is_the_fvu_when_normalised(tiny_llama, normalize_local):
    """The local term reported (and weighted) is the fraction of variance unexplained of the batch,
    from its definition in float64; unnormalised, the raw squared error per token."""
    point = hook(tiny_llama, 1, "resid")
    trainer = build_trainer(topk_config(10))
    end_to_end = EndToEnd(trainer, tiny_llama, point, local_weight=1.0, ctx_len=CTX,
                          normalize_local=normalize_local)
    texts = random_texts(6, seed=36)
    end_to_end.update(0, texts)  # step 0 initialises b_dec
    before = {name: value.clone() for name, value in trainer.ae.state_dict().items()}
    values = end_to_end.clean(texts)
    end_to_end.update(1, texts)
    reference = build_trainer(topk_config(10)).ae
    reference.load_state_dict(before)
    x = values["source"][values["mask"]].double()
    with torch.no_grad():
        error = (reference.double()(x) - x).pow(2).sum(-1).mean()
    expected = error / (x - x.mean(0)).pow(2).sum(-1).mean() if normalize_local else error
    assert trainer.last_metrics["local"] == pytest.approx(expected.item(), rel=1e-4)
    assert end_to_end.config["end_to_end"]["normalize_local"] is normalize_local


def test_resume_equals_uninterrupted(tmp_path, tiny_llama):
    point = hook(tiny_llama, 1, "resid")
    texts = random_texts(80, seed=35)
    options = dict(progress=False,
                   end_to_end={"model": tiny_llama, "hooks": (point,), "kl_weight": 1.0,
                               "ce_weight": 0.1, "local_weight": 0.5, "ctx_len": CTX})
    straight = trainSAE(text_batches(texts, 4), [topk_config(12)], 12, save_dir=tmp_path / "a",
                        **options)
    with pytest.raises(Crash):
        trainSAE(crashing(text_batches(texts, 4), after=7), [topk_config(12)], 12,
                 save_dir=tmp_path / "b", checkpoint_steps=3, **options)
    resumed = trainSAE(text_batches(texts, 4), [topk_config(12)], 12, save_dir=tmp_path / "b",
                       resume=True, **options)
    for (name, a), b in zip(straight[0].ae.state_dict().items(),
                            resumed[0].ae.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bad_end_to_end_arguments(tiny_llama):
    point = hook(tiny_llama, 1, "resid")
    trainer = build_trainer(topk_config(5))
    with pytest.raises(ValueError, match="kl_weight > 0 or ce_weight > 0"):
        EndToEnd(trainer, tiny_llama, point, kl_weight=0.0)
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        EndToEnd(trainer, tiny_llama, point, local_weight=-1)
    with pytest.raises(TypeError, match="normalize_local must be True or False"):
        EndToEnd(trainer, tiny_llama, point, normalize_local="yes")
    with pytest.raises(ValueError, match="needs one hook point"):
        EndToEnd(trainer, tiny_llama, (point, point))
    with pytest.raises(ValueError, match="normalize_activations=False"):
        trainSAE(text_batches(random_texts(8, seed=1), 4), [topk_config(2)], 2,
                 normalize_activations=True, end_to_end={"model": tiny_llama, "hooks": (point,)})
    with pytest.raises(ValueError, match="other shapes"):
        build_trainer(topk_config(5, dict_size=128, initial_weights=_saved(trainer)))


def _saved(trainer):
    import tempfile

    from dictionary_learning.utils import save_dictionary

    folder = tempfile.mkdtemp()
    save_dictionary(trainer.ae, folder)
    return folder

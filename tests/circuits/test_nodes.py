"""Node effects against independent truth: finite differences of real patched runs (attribution
patching is their limit), plain PyTorch forward hooks patching a whole site (integrated gradients'
effects at a site sum to it), and plain-hook autograd at the neurons (an IdentityDict's nodes)."""

import pytest
import torch

from dictionary_learning import hook
from dictionary_learning.circuits.nodes import (
    as_encoding,
    logit_difference,
    node_effects,
    run_metric,
)
from dictionary_learning.circuits.sites import Site, as_sites
from dictionary_learning.dictionary import AutoEncoder, AutoEncoderTopK, IdentityDict

CLEAN_ANSWERS, PATCH_ANSWERS = torch.tensor([3, 4]), torch.tensor([7, 9])
METRIC = logit_difference(CLEAN_ANSWERS, PATCH_ANSWERS)


def randomized(dictionary, seed, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in dictionary.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return dictionary.double()


def prompts(seed=1, batch=2, seq=6):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(5, 200, (batch, seq), generator=generator),
            torch.randint(5, 200, (batch, seq), generator=generator))


def make_sites(model):
    d = model.config.hidden_size
    transcoder = randomized(AutoEncoderTopK(d, 48, 6, transcoder=True), 3, scale=0.1)
    return as_sites({
        "resid_0": (randomized(AutoEncoder(d, 64), 1), hook(model, 0, "resid")),
        "mlp_1": (transcoder, (hook(model, 1, "mlp_in"), hook(model, 1, "mlp_out"))),
        "attn_1": (randomized(AutoEncoder(d, 32), 2), hook(model, 1, "attn_out")),
    })


def plain_metric(model, ids, replace=None):
    """The metric of a plain forward, `replace = (point, value)` writing `value` over the point's
    output (or input) with a PyTorch hook."""
    torch_model = model._module
    handles = []
    if replace is not None:
        point, value = replace
        module = torch_model.get_submodule(point.path)
        if point.io == "output":
            def swap(module, args, out):
                return (value, *out[1:]) if isinstance(out, tuple) else value
            handles.append(module.register_forward_hook(swap))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, args: (value, *args[1:])))
    return hooked_metric(model, ids, handles)


def hooked_metric(model, ids, handles):
    """The metric of a plain forward with the hooks whose `handles` are given, then removed."""
    try:
        with torch.no_grad():
            return METRIC(model._module(ids).logits)
    finally:
        for handle in handles:
            handle.remove()


def plain_value(model, ids, point):
    torch_model, seen = model._module, {}
    module = torch_model.get_submodule(point.path)

    def take(value):
        seen["x"] = value[0] if isinstance(value, tuple) else value
    handle = (module.register_forward_hook(lambda m, a, out: take(out)) if point.io == "output"
              else module.register_forward_pre_hook(lambda m, args: take(args)))
    try:
        with torch.no_grad():
            torch_model(ids)
    finally:
        handle.remove()
    return seen["x"]


def test_attribution_is_the_limit_of_real_patches(model64):
    """(metric(one node moved eps of the way to its patch value) - metric(clean)) / eps tends to
    the attribution effect as eps shrinks, for the largest feature and error node of each site."""
    sites = make_sites(model64)
    clean, patch = prompts()
    effects = node_effects(model64, sites, clean, patch, METRIC)
    clean_metric, clean_values = run_metric(model64, sites, as_encoding(clean), METRIC)
    _, patch_values = run_metric(model64, sites, as_encoding(patch), METRIC)
    torch.testing.assert_close(clean_metric, plain_metric(model64, clean))
    for site in sites:
        for node in ("feature", "error"):
            table = effects.features[site.name] if node == "feature" else effects.errors[site.name]
            where = tuple(int(i) for i in torch.unravel_index(table.abs().argmax(), table.shape))
            errors = []
            for eps in (1e-2, 1e-3):
                def moved(features, error, eps=eps, where=where, node=node, name=site.name):
                    features, error = features.clone(), error.clone()
                    if node == "feature":
                        target = patch_values[name].features[where]
                        features[where] += eps * (target - features[where])
                    else:
                        target = patch_values[name].error[where]
                        error[where] += eps * (target - error[where])
                    return features, error
                value, _ = run_metric(model64, sites, as_encoding(clean), METRIC,
                                      {site.name: moved})
                finite = (value - clean_metric)[where[0]] / eps
                errors.append(abs(finite - table[where]).item())
            scale = table.abs().max().item()
            assert scale > 1e-4, f"{site.name} {node}: no effect to compare"
            assert errors[1] < 0.01 * scale + 1e-6, (site.name, node, errors, scale)
            assert errors[1] < 0.2 * errors[0] + 1e-6, (site.name, node, errors)  # first order


def test_integrated_gradients_sum_to_patching_the_whole_site(model64):
    """At each site, the features' and the error's IG effects (summed over positions) add up to
    the effect of writing the patch run's value over the site, measured with plain PyTorch hooks;
    attribution patching's sum is only a first-order guess, and the error shrinks with steps."""
    sites = make_sites(model64)
    clean, patch = prompts()
    clean_metric = plain_metric(model64, clean)
    gaps = {}
    for steps in (2, 32):
        effects = node_effects(model64, sites, clean, patch, METRIC, method="ig", steps=steps)
        for site in sites:
            truth = plain_metric(model64, clean,
                                 (site.point, plain_value(model64, patch, site.point)))
            total = (effects.features[site.name].sum((1, 2))
                     + effects.errors[site.name].sum(1))
            gaps.setdefault(site.name, []).append((total - (truth - clean_metric)).abs().max())
            scale = (truth - clean_metric).abs().max()
            assert scale > 1e-4
    for name, (coarse, fine) in gaps.items():
        assert fine < 1e-4 + 0.05 * coarse, (name, coarse, fine)


def test_identity_dictionary_nodes_are_neuron_attributions(tiny_llama):
    """With an IdentityDict (features = the activation, error 0) the node effects are
    (x_patch - x_clean) * d metric / d x from a plain PyTorch hook and autograd."""
    point = hook(tiny_llama, 1, "resid")
    d = tiny_llama.config.hidden_size
    clean, patch = prompts(seed=4)
    effects = node_effects(tiny_llama, [Site("resid_1", IdentityDict(d), point)], clean, patch,
                           METRIC)
    module, kept = tiny_llama._module.get_submodule(point.path), {}

    def retain(module, args, out):
        value = out[0] if isinstance(out, tuple) else out
        value = value.detach().requires_grad_(True)
        kept["x"] = value
        return (value, *out[1:]) if isinstance(out, tuple) else value
    handle = module.register_forward_hook(retain)
    try:
        metric = METRIC(tiny_llama._module(clean).logits).sum()
        gradient, = torch.autograd.grad(metric, kept["x"])
    finally:
        handle.remove()
    expected = (plain_value(tiny_llama, patch, point) - kept["x"].detach()) * gradient
    torch.testing.assert_close(effects.features["resid_1"], expected, atol=1e-5, rtol=1e-4)
    assert effects.errors["resid_1"].abs().max() < 1e-5
    torch.testing.assert_close(effects.total, plain_metric(tiny_llama, patch)
                               - plain_metric(tiny_llama, clean))


def test_zero_ablation_and_aggregation(tiny_llama):
    """patch=None moves every node to zero, the site's value to decode(0) (the decoder bias): its
    IG effects sum to writing that over the site with a plain hook."""
    sites = make_sites(tiny_llama)[:1]
    clean, _ = prompts(seed=5)
    effects = node_effects(tiny_llama, sites, clean, None, METRIC, method="ig", steps=96)
    point, dictionary = sites[0].point, sites[0].dictionary
    value = plain_value(tiny_llama, clean, point)
    with torch.no_grad():
        ablated = dictionary.decode(torch.zeros(*value.shape[:2], 64, dtype=torch.float64))
    truth = (plain_metric(tiny_llama, clean, (point, ablated.float()))
             - plain_metric(tiny_llama, clean))
    summed = effects.summed()
    site_total = summed.features["resid_0"].sum(1) + summed.errors["resid_0"]
    torch.testing.assert_close(site_total.float(), truth, atol=5e-3, rtol=0.02)
    torch.testing.assert_close(effects.total, truth, atol=1e-5, rtol=1e-5)
    mean = summed.mean()
    assert mean.features["resid_0"].shape == (64,) and mean.errors["resid_0"].shape == ()


def test_bad_input_is_refused(tiny_llama):
    sites = make_sites(tiny_llama)
    clean, patch = prompts()
    with pytest.raises(ValueError, match="one shape"):
        node_effects(tiny_llama, sites, clean, patch[:, :4], METRIC)
    mask = torch.ones_like(clean)
    mask[:, 0] = 0
    padded = {"input_ids": clean, "attention_mask": mask}
    with pytest.raises(ValueError, match="padded"):
        node_effects(tiny_llama, sites, padded, patch, METRIC)
    with pytest.raises(ValueError, match="method"):
        node_effects(tiny_llama, sites, clean, patch, METRIC, method="exact")
    with pytest.raises(ValueError, match="steps"):
        node_effects(tiny_llama, sites, clean, patch, METRIC, method="ig", steps=0)
    with pytest.raises(ValueError, match="metric"):
        node_effects(tiny_llama, sites, clean, patch)
    with pytest.raises(ValueError, match=r"one value per example, a tensor \[2\], got Tensor\[\]"):
        node_effects(tiny_llama, sites, clean, patch, lambda logits: logits.sum())
    d = tiny_llama.config.hidden_size
    with pytest.raises(ValueError, match="transcoder"):
        Site("t", AutoEncoderTopK(d, 8, 2, transcoder=True), hook(tiny_llama, 0, "mlp_out"))
    with pytest.raises(ValueError, match="own name"):
        as_sites([sites[0], sites[0]])


def test_left_rule_with_one_step_is_attribution_patching(tiny_llama):
    """feature-circuits' IG rule (alpha = i / steps) at one step takes the gradient at the clean
    values only: attribution patching's effects."""
    sites = make_sites(tiny_llama)
    clean, patch = prompts(seed=6)
    ig = node_effects(tiny_llama, sites, clean, patch, METRIC, method="ig", steps=1,
                      ig_rule="left")
    attribution = node_effects(tiny_llama, sites, clean, patch, METRIC)
    for site in sites:
        torch.testing.assert_close(ig.features[site.name], attribution.features[site.name])
        torch.testing.assert_close(ig.errors[site.name], attribution.errors[site.name])
    with pytest.raises(ValueError, match="ig_rule"):
        node_effects(tiny_llama, sites, clean, patch, METRIC, method="ig", ig_rule="right")

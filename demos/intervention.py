"""Amplify or ablate one learned feature inside SmolLM2 with nnsight and watch the next-token predictions change.

    python demos/intervention.py [path/to/saved/sae]     # default: the quickstart's reports/quickstart/sae/trainer_0

Run `python -m dictionary_learning train` first (or pass any saved SAE on a SmolLM2 residual stream).
"""

import sys

import torch

from dictionary_learning import hook, load_model
from dictionary_learning.utils import load_dictionary

path = sys.argv[1] if len(sys.argv) > 1 else "reports/quickstart/sae/trainer_0"
sae, config = load_dictionary(path)
model = load_model(config["trainer"]["lm_name"])
layer = config["trainer"]["layer"]
point = hook(model, layer, "resid")
prompt = "The function returns a list of"
inputs = model.tokenizer(prompt, return_tensors="pt")
layer_module = model.get(point.path)

# the feature most active on the last token of the prompt
with torch.no_grad(), model.trace(dict(inputs)) as tracer:
    resid = layer_module.output.save()
    tracer.stop()
codes = sae.encode(resid[0, -1:].float())[0]
feature = int(codes.argmax())
direction = sae.decoder.weight[:, feature].detach()  # unit norm
print(f"{point}: feature {feature} is the strongest on the last token of {prompt!r} (activation {codes[feature]:.2f})")


def top_tokens(logits, n=8):
    probabilities = logits.softmax(-1)
    values, indices = probabilities.topk(n)
    return ", ".join(f"{model.tokenizer.decode(int(i))!r} {v:.2f}" for v, i in zip(values, indices))


def run(edit=None):
    with torch.no_grad(), model.trace(dict(inputs)):
        if edit is not None:
            hidden = layer_module.output
            layer_module.output = edit(hidden)
        logits = model.output.logits.save()
    return logits[0, -1]


clean = run()
activation = codes[feature]
# ablate: remove the feature's contribution (its activation times its decoder direction) at the last position
ablated = run(lambda h: torch.cat([h[:, :-1], h[:, -1:] - activation * direction], dim=1))
# amplify: add 4x the feature's usual contribution at every position
amplified = run(lambda h: h + 4 * activation * direction)
print("clean     :", top_tokens(clean))
print("ablated   :", top_tokens(ablated))
print("amplified :", top_tokens(amplified))
kl = lambda a, b: (a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum().item()  # noqa: E731
print(f"KL(clean || ablated) = {kl(clean, ablated):.3f}, KL(clean || amplified) = {kl(clean, amplified):.3f}")

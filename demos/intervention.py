"""Amplify or ablate one learned feature inside SmolLM2 with nnsight and watch the next-token
predictions change: the feature most active on the prompt's last token is removed there (ablated)
and added at every position at a multiple of its activation (amplified).

    python demos/intervention.py [path/to/saved/sae]   # default: reports/quickstart/sae/trainer_0
    python demos/intervention.py --prompt "import numpy as" --amplify 8

Run `python -m dictionary_learning train` first (or pass any saved SAE on a residual stream; the
model is the one its config.json names). Writes nothing.
"""

import argparse

import torch

from dictionary_learning import hook, load_model
from dictionary_learning.utils import load_dictionary


def parser() -> argparse.ArgumentParser:
    """The demo's options; their defaults are the settings the demo was written with."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", default="reports/quickstart/sae/trainer_0",
                   help="a saved SAE folder (ae.pt + config.json) on a residual stream "
                   "(default %(default)s)")
    p.add_argument("--model", help="the model to patch (default: the lm_name of the SAE's config)")
    p.add_argument("--prompt", default="The function returns a list of",
                   help="the text to run (default %(default)r)")
    p.add_argument("--amplify", type=float, default=4.0,
                   help="multiple of the feature's contribution added when amplifying "
                   "(default %(default)s)")
    p.add_argument("--top", type=int, default=8,
                   help="next tokens shown per prediction (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sae, config = load_dictionary(args.path)
    model = load_model(args.model or config["trainer"]["lm_name"])
    layer = config["trainer"]["layer"]
    point = hook(model, layer, "resid")
    inputs = model.tokenizer(args.prompt, return_tensors="pt")
    layer_module = model.get(point.path)

    # the feature most active on the last token of the prompt
    with torch.no_grad(), model.trace(dict(inputs)) as tracer:
        resid = layer_module.output.save()
        tracer.stop()
    codes = sae.encode(resid[0, -1:].float())[0]
    feature = int(codes.argmax())
    direction = sae.decoder.weight[:, feature].detach()  # unit norm
    print(f"{point}: feature {feature} is the strongest on the last token of {args.prompt!r} "
          f"(activation {codes[feature]:.2f})")

    def top_tokens(logits):
        probabilities = logits.softmax(-1)
        values, indices = probabilities.topk(args.top)
        return ", ".join(f"{model.tokenizer.decode(int(i))!r} {v:.2f}"
                         for v, i in zip(values, indices))

    def run(edit=None):
        with torch.no_grad(), model.trace(dict(inputs)):
            if edit is not None:
                hidden = layer_module.output
                layer_module.output = edit(hidden)
            logits = model.output.logits.save()
        return logits[0, -1]

    clean = run()
    activation = codes[feature]
    # ablate: remove the feature's contribution (its activation times its decoder direction) at the
    # last position
    ablated = run(lambda h: torch.cat([h[:, :-1], h[:, -1:] - activation * direction], dim=1))
    # amplify: add a multiple of the feature's usual contribution at every position
    amplified = run(lambda h: h + args.amplify * activation * direction)
    print("clean     :", top_tokens(clean))
    print("ablated   :", top_tokens(ablated))
    print("amplified :", top_tokens(amplified))

    def kl(a, b):
        return (a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum().item()

    print(f"KL(clean || ablated) = {kl(clean, ablated):.3f}, "
          f"KL(clean || amplified) = {kl(clean, amplified):.3f}")


if __name__ == "__main__":
    main()

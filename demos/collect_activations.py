"""Read SmolLM2's MLP input and output at one layer on the offline corpus and look at what comes out.

    python demos/collect_activations.py
"""

import torch

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model

model = load_model("smollm2-135m")
layer = 6
buffer = ActivationBuffer(
    default_corpus(), model, (hook(model, layer, "mlp_in"), hook(model, layer, "mlp_out")), io="in_to_out",
    n_ctxs=64, ctx_len=128, refresh_batch_size=16, out_batch_size=2048, remove_bos=True,
)
x_in, x_out = next(buffer)
print(f"layer {layer}: {x_in.shape[0]} token pairs, MLP input width {x_in.shape[1]}, output width {x_out.shape[1]}")
print(f"mean norm in {x_in.norm(dim=-1).mean():.1f}, out {x_out.norm(dim=-1).mean():.1f}")

# how much of the MLP's output does a least-squares linear map from its input explain? (a transcoder's baseline)
weights = torch.linalg.lstsq(x_in.float(), x_out.float()).solution
residual = x_out.float() - x_in.float() @ weights
fvu = residual.pow(2).sum() / (x_out.float() - x_out.float().mean(0)).pow(2).sum()
print(f"a linear map explains {1 - fvu:.1%} of the MLP output's variance on these tokens (in-sample)")
print("buffer config:", buffer.config)

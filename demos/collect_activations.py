"""Read SmolLM2's MLP input and output at one layer on the offline corpus and look at what comes
out: their widths and norms, and how much of the output a least-squares linear map from the input
explains (a transcoder's baseline).

    python demos/collect_activations.py
    python demos/collect_activations.py --model tiny-llama --layer 1 --tokens 512   # a quick check

Writes nothing.
"""

import argparse

import torch

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model

CTX_LEN = 128


def parser() -> argparse.ArgumentParser:
    """The demo's options; their defaults are the settings the demo was written with."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), tiny-llama, tiny-gpt2, a local folder or a hub id")
    p.add_argument("--layer", type=int, default=6,
                   help="the MLP of this layer (default %(default)s)")
    p.add_argument("--tokens", type=int, default=2048,
                   help="token pairs (MLP input, output) to read (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    model = load_model(args.model)
    layer = args.layer
    points = (hook(model, layer, "mlp_in"), hook(model, layer, "mlp_out"))
    n_ctxs = max(64, 2 * -(-args.tokens // CTX_LEN))  # the buffer holds at least twice the batch
    buffer = ActivationBuffer(default_corpus(), model, points, io="in_to_out", n_ctxs=n_ctxs,
                              ctx_len=CTX_LEN, refresh_batch_size=16, out_batch_size=args.tokens,
                              remove_bos=True,
                              max_activation_norm_multiple=10)
    x_in, x_out = next(buffer)
    print(f"layer {layer}: {x_in.shape[0]} token pairs, MLP input width {x_in.shape[1]}, "
          f"output width {x_out.shape[1]}")
    print(f"mean norm in {x_in.norm(dim=-1).mean():.1f}, out {x_out.norm(dim=-1).mean():.1f}")

    # how much of the MLP's output does a least-squares linear map from its input explain?
    weights = torch.linalg.lstsq(x_in.float(), x_out.float()).solution
    residual = x_out.float() - x_in.float() @ weights
    fvu = residual.pow(2).sum() / (x_out.float() - x_out.float().mean(0)).pow(2).sum()
    print(f"a linear map explains {1 - fvu:.1%} of the MLP output's variance on these tokens "
          "(in-sample)")
    print("buffer config:", buffer.config)


if __name__ == "__main__":
    main()

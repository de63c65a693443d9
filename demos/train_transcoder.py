"""Train a TopK transcoder from SmolLM2's layer-6 MLP input (after its norm) to the MLP's output,
and measure the language-model loss with the transcoder standing in for the MLP.

    python demos/train_transcoder.py                  # SmolLM2-135M, 150 steps of 1,024 tokens
    python demos/train_transcoder.py --model tiny-llama --steps 5 --batch 64   # a quick check

Writes runs/demo_transcoder/trainer_0.
"""

import argparse

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.evaluation import evaluate
from dictionary_learning.models import d_model, n_layers
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary


def parser() -> argparse.ArgumentParser:
    """The demo's options; their defaults are the settings the demo was written with."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), tiny-llama, tiny-gpt2, a local folder or a hub id")
    p.add_argument("--layer", type=int, default=None,
                   help="the MLP of this layer (default: 6, or the middle layer of a shallower "
                   "model)")
    p.add_argument("--steps", type=int, default=150, help="training steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=1024,
                   help="activation pairs per training step (default %(default)s)")
    p.add_argument("--dict-size", type=int, default=None,
                   help="features (default: 4 x the model width, 2,304 for SmolLM2)")
    p.add_argument("--k", type=int, default=32,
                   help="active features per token (default %(default)s)")
    p.add_argument("--out", default="runs/demo_transcoder",
                   help="where to save the transcoder (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    model = load_model(args.model)
    layer = args.layer if args.layer is not None else min(6, n_layers(model) // 2)
    width = d_model(model)
    points = (hook(model, layer, "mlp_in"), hook(model, layer, "mlp_out"))
    buffer = ActivationBuffer(default_corpus(repeat=True), model, points, io="in_to_out",
                              n_ctxs=128, ctx_len=128, refresh_batch_size=32,
                              out_batch_size=args.batch, remove_bos=True,
                              max_activation_norm_multiple=10)
    config = dict(trainer=TopKTrainer, activation_dim=width, output_dim=width, transcoder=True,
                  skip=True, dict_size=args.dict_size or 4 * width, k=args.k, lr=1e-3,
                  steps=args.steps, warmup_steps=max(1, args.steps // 10), seed=0, layer=layer,
                  lm_name=args.model, submodule_name=f"layers.{layer}.mlp",
                  dead_feature_threshold=100_000)
    trainSAE(buffer, [config], args.steps, save_dir=args.out, normalize_activations="d_model",
             log_steps=max(1, args.steps // 6))

    transcoder, _ = load_dictionary(f"{args.out}/trainer_0")
    metrics = evaluate(transcoder, buffer, batch_size=8, n_batches=2, loss_batches=1)
    print(f"transcoder: fvu of the MLP output {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}; "
          f"CE clean {metrics['ce_clean']:.3f}, with the transcoder as the MLP "
          f"{metrics['ce_patched']:.3f}, MLP zeroed {metrics['ce_zero']:.3f}: "
          f"{metrics['frac_recovered']:.1%} of the MLP's loss contribution recovered")


if __name__ == "__main__":
    main()

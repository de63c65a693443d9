"""Train a TopK SAE and a BatchTopK SAE together on SmolLM2's layer-6 residual stream (each batch
read once), then evaluate both (FVU, L0, alive features, CE with the SAE patched in).

    python demos/train_sae.py                 # SmolLM2-135M, 150 steps of 1,024 tokens
    python demos/train_sae.py --cache acts/   # read the activations into a disk cache once
    python demos/train_sae.py --model tiny-llama --steps 5 --batch 64   # a quick check

With --cache, the activations are first written to that folder (skipped if it already holds them
all; an interrupted write continues) and both SAEs train from it, so later runs need no model
forward.
Writes runs/demo_sae/trainer_0 (TopK) and trainer_1 (BatchTopK).
"""

import argparse

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.cache import ActivationCache, write_cache
from dictionary_learning.dictionary import AutoEncoderTopK, BatchTopKSAE
from dictionary_learning.evaluation import evaluate
from dictionary_learning.models import d_model, n_layers
from dictionary_learning.trainers import BatchTopKTrainer, TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary


def parser() -> argparse.ArgumentParser:
    """The demo's options; their defaults are the settings the demo was written with."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), tiny-llama, tiny-gpt2, a local folder or a hub id")
    p.add_argument("--layer", type=int, default=None,
                   help="residual stream after this layer (default: 6, or the middle layer of a "
                   "shallower model)")
    p.add_argument("--steps", type=int, default=150, help="training steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=1024,
                   help="activations per training step (default %(default)s)")
    p.add_argument("--dict-size", type=int, default=None,
                   help="features per SAE (default: 4 x the model width, 2,304 for SmolLM2)")
    p.add_argument("--k", type=int, default=32,
                   help="active features per token (default %(default)s)")
    p.add_argument("--cache", help="an activation cache folder to write (once) and train from")
    p.add_argument("--out", default="runs/demo_sae",
                   help="where to save the SAEs (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    model = load_model(args.model)
    layer = args.layer if args.layer is not None else min(6, n_layers(model) // 2)
    width = d_model(model)
    point = hook(model, layer, "resid")
    buffer = ActivationBuffer(default_corpus(repeat=True), model, point, n_ctxs=128, ctx_len=128,
                              refresh_batch_size=32, out_batch_size=args.batch, remove_bos=True,
                              max_activation_norm_multiple=10)
    data = buffer
    if args.cache:  # steps batches plus the normalisation batches, read once
        write_cache(model, default_corpus(repeat=True), point, args.cache,
                    n_tokens=(args.steps + 8) * args.batch, remove_bos=True,
                    max_activation_norm_multiple=10, model_name=args.model,
                    source="python-docs")
        data = ActivationCache(args.cache, batch_size=args.batch, epochs=None)
    common = dict(activation_dim=width, dict_size=args.dict_size or 4 * width, k=args.k, lr=1e-3,
                  steps=args.steps, warmup_steps=max(1, args.steps // 10), seed=0, layer=layer,
                  lm_name=args.model, submodule_name=str(point), dead_feature_threshold=100_000)
    configs = [dict(trainer=TopKTrainer, dict_class=AutoEncoderTopK, wandb_name="topk", **common),
               dict(trainer=BatchTopKTrainer, dict_class=BatchTopKSAE, wandb_name="batchtopk",
                    **common)]
    trainSAE(data, configs, args.steps, save_dir=args.out, normalize_activations="d_model",
             log_steps=max(1, args.steps // 6))

    for i, name in enumerate(("TopK", "BatchTopK")):
        sae, _ = load_dictionary(f"{args.out}/trainer_{i}")
        metrics = evaluate(sae, buffer, batch_size=8, n_batches=2, loss_batches=1)
        print(f"{name:9s} fvu {metrics['fvu']:.3f}  L0 {metrics['l0']:.1f}  "
              f"alive {metrics['frac_alive']:.2f}  CE clean {metrics['ce_clean']:.3f} "
              f"patched {metrics['ce_patched']:.3f} zero {metrics['ce_zero']:.3f}  "
              f"recovered {metrics['frac_recovered']:.3f}")


if __name__ == "__main__":
    main()

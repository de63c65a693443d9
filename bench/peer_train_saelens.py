"""Train a SAELens TopK, BatchTopK or Matryoshka BatchTopK SAE on given activations in a given batch
order with SAELens' own `SAETrainer.fit()`, inside SAELens' venv (this script never imports our
`dictionary_learning`); `bench/quality.py` runs it.

    <sae-lens venv>/bin/python bench/peer_train_saelens.py --data DIR --architecture topk --out DIR

`DIR/activations.safetensors` holds "activations" `[n, d]` (float32) and "order" `[steps, batch]`.
The data provider yields the first `--norm-batches` batches of the order once more, first, for
SAELens' scale estimate (normalize_activations="expected_average_only_in", which its trainer folds
into the weights at the end), then exactly the order's batches, one per step. Everything else is
SAELens' default for its language-model runner: Adam (0.9, 0.999), lr 3e-4 constant (lr_end
lr / 10 where a decay is asked for), AuxK coefficient 1 over latents dead for 1,000 steps,
decoder initialised at norm 0.1, and for TopK `rescale_acts_by_decoder_norm` (folded into the
weights when saved). Saves with `save_inference_model(out)` (BatchTopK and Matryoshka as JumpReLU,
as SAELens does).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--architecture", choices=["topk", "batchtopk", "matryoshka"],
                        default="topk")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--widths", default="",
                        help="Matryoshka's nested widths, comma-separated, the last = --d-sae")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--decay-steps", type=int, default=0)
    parser.add_argument("--norm-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        SAETrainer,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from safetensors.torch import load_file

    data = load_file(f"{args.data}/activations.safetensors")
    activations, order = data["activations"].float(), data["order"].long()
    steps, batch = order.shape
    torch.manual_seed(args.seed)
    common = dict(d_in=activations.shape[1], d_sae=args.d_sae, k=args.k, dtype="float32",
                  device="cpu", normalize_activations="expected_average_only_in")
    if args.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    elif args.architecture == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    else:
        widths = [int(w) for w in args.widths.split(",")]
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=widths, **common))
    config = SAETrainerConfig(total_training_samples=steps * batch,
                              train_batch_size_samples=batch, lr=args.lr, lr_end=args.lr / 10,
                              lr_warm_up_steps=args.warmup_steps,
                              lr_decay_steps=args.decay_steps,
                              n_batches_for_norm_estimate=args.norm_batches)
    rows = itertools.chain(order[:args.norm_batches], order)
    started = time.perf_counter()
    trainer = SAETrainer(cfg=config, sae=sae,
                         data_provider=(activations[index] for index in rows))
    trainer.fit()
    sae.save_inference_model(args.out)
    print(json.dumps({"architecture": args.architecture, "steps": trainer.n_training_steps,
                      "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()

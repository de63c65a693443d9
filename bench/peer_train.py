"""Train EleutherAI sparsify's TopK SparseCoder on given activations in a given batch order, as its
`Trainer.fit()` does for one hook point, inside sparsify's own venv (this script never imports our
`dictionary_learning`); `bench/quality.py` runs it.

    <sparsify venv>/bin/python bench/peer_train.py --data DIR --optimizer signum|adam --out DIR

`DIR/activations.safetensors` holds "activations" `[n, d]` (float32), "order" `[steps, batch]`
(row indices of each step's batch) and, for a transcoder (`transcode=True`; `--skip`: with its skip
connection), "targets" `[n, d]`. Per step, as sparsify's trainer: at step 0 b_dec at the first
batch's target mean (and for a transcoder the encoder bias centring its input), unit-norm decoder
(not for a transcoder), forward with the dead mask (FVU + `--auxk-alpha` * AuxK; its default
alpha is 0), backward, the gradient parallel to the decoder directions removed (not for a
transcoder), the optimizer step, the fired-latent bookkeeping. Optimizers as its trainer builds
them: "signum" (its default: ScheduleFree-wrapped SignSGD, momentum 0.95, lr 5e-3 /
sqrt(latents / 2^14), the averaged weights saved) or "adam" (lr 2e-4 / sqrt(latents / 2^14),
linear warmup over `--warmup-steps` then linear decay to 0). Saves with
`SparseCoder.save_to_disk(out/layers)`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--optimizer", choices=["signum", "adam"], default="signum")
    parser.add_argument("--num-latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--auxk-alpha", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", action="store_true", help="a transcoder's skip connection")
    args = parser.parse_args()

    from safetensors.torch import load_file
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.config import TrainConfig
    from sparsify.sign_sgd import SignSGD
    from transformers import get_linear_schedule_with_warmup

    data = load_file(f"{args.data}/activations.safetensors")
    activations, order = data["activations"].float(), data["order"].long()
    targets = data["targets"].float() if "targets" in data else None
    transcode = targets is not None
    steps = order.shape[0]
    torch.manual_seed(args.seed)
    config = SparseCoderConfig(num_latents=args.num_latents, k=args.k, transcode=transcode,
                               skip_connection=args.skip)
    sae = SparseCoder(activations.shape[1], config, "cpu", dtype=torch.float32)
    threshold = TrainConfig(config).dead_feature_threshold
    scale = (args.num_latents / 2**14) ** 0.5
    schedulers = []
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / scale)
        schedulers.append(get_linear_schedule_with_warmup(optimizer, args.warmup_steps, steps))
    else:
        from schedulefree import ScheduleFreeWrapper

        optimizer = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=5e-3 / scale), momentum=0.95)
        optimizer.train()
    since_fired = torch.zeros(args.num_latents, dtype=torch.long)
    losses, started = [], time.perf_counter()
    for step in range(steps):
        x = activations[order[step]]
        y = targets[order[step]] if transcode else x
        if step == 0:
            if transcode:
                sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
            sae.b_dec.data = y.mean(0)
        if not transcode:
            sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > threshold if args.auxk_alpha > 0 else None
        out = sae(x, y if transcode else None, dead_mask=dead)
        loss = out.fvu + args.auxk_alpha * out.auxk_loss
        loss.backward()
        if not transcode:
            sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        for scheduler in schedulers:
            scheduler.step()
        with torch.no_grad():
            since_fired += x.shape[0]
            since_fired[out.latent_indices.flatten()] = 0
        losses.append(float(out.fvu.detach()))
    if args.optimizer == "signum":
        optimizer.eval()  # ScheduleFree: the averaged weights, as sparsify saves them
    sae.save_to_disk(f"{args.out}/layers")
    print(json.dumps({"optimizer": args.optimizer, "steps": steps, "seconds":
                      time.perf_counter() - started, "last_fvu": losses[-1]}))


if __name__ == "__main__":
    main()

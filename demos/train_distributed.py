"""Data-parallel training on several GPUs (or CPU processes) with torch.distributed: each rank reads
its own share of the texts through its own copy of the model, and trainSAE combines the gradients
and statistics so the run equals one process on the global batches (rank's batch x world size).

    torchrun --nproc_per_node 4 demos/train_distributed.py                  # 4 GPUs (NCCL)
    torchrun --nproc_per_node 2 demos/train_distributed.py --model tiny-llama --steps 20 \\
        --layer 1 --batch 64                                                # CPU, gloo

Rank 0 writes runs/demo_distributed/ (trainer_0/, trainer_1/ and the checkpoint); `--resume`
continues an interrupted run. `--mode trainers` shards the trainers over the ranks instead (every
rank reads all the texts).
"""

import argparse

import torch

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.models import d_model
from dictionary_learning.trainers import TopKTrainer
from dictionary_learning.training import exit_distributed, init_distributed, shard, trainSAE


def parser() -> argparse.ArgumentParser:
    """The demo's options; their defaults are the settings the demo was written with."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), tiny-llama, tiny-gpt2, a local folder or a hub id")
    p.add_argument("--layer", type=int, default=6,
                   help="residual stream after this layer (default %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=1024,
                   help="activations per rank per step (default %(default)s)")
    p.add_argument("--mode", default="data", choices=["data", "trainers"],
                   help="data: every rank trains both SAEs on its share of each batch; trainers: "
                   "the SAEs are sharded over the ranks (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--out", default="runs/demo_distributed",
                   help="where rank 0 saves (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    rank, world_size = init_distributed()  # torchrun's environment: NCCL on CUDA, gloo otherwise
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device)
    texts = default_corpus(repeat=True)
    if args.mode == "data":
        texts = shard(texts)  # every world_size-th text, from the rank-th
    buffer = ActivationBuffer(texts, model, hook(model, args.layer, "resid"), n_ctxs=64,
                              ctx_len=128, refresh_batch_size=32, out_batch_size=args.batch,
                              remove_bos=True,
                              max_activation_norm_multiple=10, device=device, seed=rank)
    common = dict(activation_dim=d_model(model), dict_size=8 * d_model(model), k=32, lr=1e-3,
                  steps=args.steps, warmup_steps=max(1, args.steps // 10), seed=0, device=device,
                  layer=args.layer, lm_name=args.model)
    configs = [dict(trainer=TopKTrainer, **common), dict(trainer=TopKTrainer, **dict(common, k=64))]
    trainers = trainSAE(buffer, configs, args.steps, save_dir=args.out,
                        normalize_activations="d_model", resume=args.resume,
                        distributed=args.mode if world_size > 1 else None, progress=rank == 0)
    print(f"rank {rank} of {world_size} ({args.mode}): trained {len(trainers)} dictionaries here, "
          f"last FVU {trainers[0].last_metrics['fvu']:.3f}; saved to {args.out}/")
    exit_distributed()  # destroys the process group and ends the process (gloo may abort at exit)


if __name__ == "__main__":
    main()

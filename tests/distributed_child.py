"""One rank of the torch.distributed tests (tests/training/test_distributed.py), launched by
torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_child.py MODE
        SAVE_DIR STEPS \
        [resume]

MODE "data": this rank trains every trainer on its share of each global batch (rows rank*B
.. (rank+1)*B); "trainers": this rank trains its share of the trainers on every global batch;
"data-other": as "data", with the other trainers (`other_configs`). The data and configs are defined
here so that the test can train one process on the same global batches."""

import sys

import torch

D, ROWS, N_BATCHES, STEPS = 16, 64, 24, 16


def global_batches() -> list[dict]:
    """Dict batches (many hook points): "a" for SAEs, "t" an (x, y) pair for a transcoder."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(D, D, generator=generator)
    batches = []
    for _ in range(N_BATCHES):
        x = torch.randn(ROWS, D, generator=generator) * 2 + 0.5
        batches.append({"a": torch.randn(ROWS, D, generator=generator).relu() @ mixing,
                        "t": (x, (torch.tanh(x @ mixing)
                                  + 0.1 * torch.randn(ROWS, D, generator=generator)))})
    return batches


def share(batch, rank: int, world_size: int):
    """This rank's rows of a global batch (of every entry)."""
    size = ROWS // world_size
    rows = slice(rank * size, (rank + 1) * size)
    return {name: tuple(side[rows] for side in value) if isinstance(value, tuple) else value[rows]
            for name, value in batch.items()}


def configs() -> list[dict]:
    from dictionary_learning.trainers import StandardTrainer, TopKTrainer

    common = dict(activation_dim=D, steps=STEPS, device="cpu")
    # AuxK (dead latents after 128 tokens) and the inference threshold (from step 2) take part
    return [
        dict(common, trainer=TopKTrainer, dict_size=64, k=3, warmup_steps=2, seed=1,
             submodule_name="a", dead_feature_threshold=128, threshold_start_step=2, lr=3e-3),
        dict(common, trainer=StandardTrainer, dict_size=48, l1_penalty=0.05, warmup_steps=2,
             sparsity_warmup_steps=4, seed=2, submodule_name="a", dead_feature_threshold=200),
        dict(common, trainer=TopKTrainer, dict_size=64, k=4, warmup_steps=2, seed=3,
             submodule_name="t", transcoder=True, dead_feature_threshold=128,
             threshold_start_step=2, lr=3e-3),
    ]


def other_configs() -> list[dict]:
    """JumpReLU (exact under data parallelism), and BatchTopK / Matryoshka (their batch top-k is per
    rank)."""
    from dictionary_learning.trainers import (
        BatchTopKTrainer,
        JumpReluTrainer,
        MatryoshkaBatchTopKTrainer,
    )

    common = dict(activation_dim=D, steps=STEPS, device="cpu", submodule_name="a", warmup_steps=2)
    return [
        dict(common, trainer=JumpReluTrainer, dict_size=48, lr=3e-3, sparsity_warmup_steps=4,
             target_l0=4.0, seed=4),
        dict(common, trainer=BatchTopKTrainer, dict_size=64, k=3, seed=5,
             dead_feature_threshold=128, threshold_start_step=2, lr=3e-3),
        dict(common, trainer=MatryoshkaBatchTopKTrainer, dict_size=64, k=3,
             group_fractions=[0.25, 0.75], seed=6, dead_feature_threshold=128,
             threshold_start_step=2, lr=3e-3),
    ]


def main() -> None:
    from dictionary_learning.training import exit_distributed, init_distributed, trainSAE

    mode, save_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume = len(sys.argv) > 4 and sys.argv[4] == "resume"
    rank, world_size = init_distributed()
    batches = global_batches()
    trainer_configs = other_configs() if mode == "data-other" else configs()
    # this rank was given another lr: the run must refuse to start
    if mode == "data-mismatch" and rank == 1:
        trainer_configs[0]["lr"] = 1e-2
    mode = mode.removesuffix("-other").removesuffix("-mismatch")
    if mode == "data":
        batches = [share(batch, rank, world_size) for batch in batches]
    trainers = trainSAE(iter(batches), trainer_configs, steps, save_dir=save_dir,
                        normalize_activations="unit", normalization_batches=2, checkpoint_steps=3,
                        resume=resume, distributed=mode, progress=False, keep_checkpoint=True)
    if mode == "data":  # every rank ends with the same weights (thresholds included)
        for trainer in trainers:
            for value in trainer.ae.state_dict().values():
                reference = value.clone()
                torch.distributed.broadcast(reference, src=0)
                assert torch.equal(reference, value), "ranks diverged"
    # not a plain return: gloo sometimes aborts a finished process at interpreter exit
    exit_distributed()


if __name__ == "__main__":
    main()

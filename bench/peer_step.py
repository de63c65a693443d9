"""Time one TopK SAE training step of a peer package, run inside that peer's own venv.

Standalone on purpose (it never imports our `dictionary_learning`): `bench/setup_peers.sh` builds
one venv per peer, and this script is run with that venv's python, e.g.

    python bench/peer_step.py --peer dictionary-learning --d-in 576 --dict-size 4608 --k 32 \
        --batch 4096 --steps 20 --warmup 3 --dead-fraction 0.0 --seed 0 --threads 2

It builds the peer's TopK SAE and trainer the way a user of that package would, feeds it a fixed
pool of synthetic float32 activations (generated before timing), runs `--warmup` untimed steps and
then `--steps` timed steps, and prints one JSON line.

Peers:
- `dictionary-learning` (Sam Marks', PyPI 0.1.0): `TopKTrainer` + `AutoEncoderTopK`, one step =
  `trainer.update(step, x)` (loss with AuxK, backward, removal of the gradient parallel to the
  decoder directions, grad-norm clipping, Adam, LR schedule, decoder re-normalisation). Step 0 also
  computes the geometric median for `b_dec`; it falls in the untimed warm-up.
- `sae-lens` (6.x): `TopKTrainingSAE` + `SAETrainer`, one step = the body of `SAETrainer.fit()`
  without wandb: `maybe_reset_sparsity()`, `step(batch)` (training forward with MSE + TopK AuxK
  loss, dead-latent bookkeeping, backward, grad-norm clipping, Adam, LR schedule), `n_training_steps
  += 1`. sae-lens keeps the decoder un-normalised and rescales activations by the decoder norms
  (`rescale_acts_by_decoder_norm=True`, its default); it does no per-step decoder re-normalisation.
  `--sparse-activations` turns on its `use_sparse_activations` option, which crashes in a CPU
  training step (see the JSON "error").
- `eai-sparsify` (EleutherAI, 1.x): `SparseCoder` (fused TopK encoder, `embedding_bag` decode off
  CUDA, Triton on CUDA), one step = the body of sparsify's `Trainer.fit()` for one hook point:
  decoder re-normalisation, forward with the dead mask (FVU + `auxk_alpha` * AuxK, its defaults),
  backward, removal of the gradient parallel to the decoder directions, Adam at its default lr (2e-4
  / sqrt(dict_size / 2^14)), the fired-latent bookkeeping. Its forward autocasts to bfloat16 on CUDA
  only, so on the CPU it runs in float32.

Besides the requested keys the JSON line carries step_ms_median / step_ms_min, cpu_ms_per_step, the
median of the steps that had all their threads (`uncontended_*`: the figure to trust on a shared
machine), `reference_gemm_ms` (one dense batch x d_in x dict_size GEMM, to normalise across
sessions), the 1-minute load average, the peer's dead-latent count and its last AuxK loss; on
failure an "error" key and where it happened.

`--dead-fraction f`: the first round(f * dict_size) latents (after a seeded permutation) are made
really dead (their encoder bias is set far below any pre-activation, so they never fire) and the
peer's own dead-latent tracking state is set so they already count as dead (dictionary-learning:
`num_tokens_since_fired` at its 10M-token threshold; sae-lens: `n_forward_passes_since_fired` past
`dead_feature_window`). The AuxK path then runs on every step; the JSON reports the peer's own
dead-latent count after the last timed step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEERS = ("dictionary-learning", "sae-lens", "eai-sparsify")
POOL_BATCHES = 4  # distinct batches generated up front and cycled through


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", required=True, choices=PEERS)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--dict-size", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dead-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="activations are scale * randn")
    parser.add_argument("--sparse-activations", action="store_true",
                        help="sae-lens only: use_sparse_activations=True (crashes on CPU)")
    parser.add_argument("--device", default="cpu",
                        help="eai-sparsify only: cuda runs its Triton kernels where triton imports")
    parser.add_argument("--transcoder", action="store_true",
                        help="eai-sparsify only: a transcoder (transcode=True) from x to a "
                             "target y of the same width (a second pool of activations)")
    args = parser.parse_args(argv)
    for name in ("d_in", "dict_size", "k", "batch", "steps", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (step 0 does one-off initialisation), got "
                     f"{args.warmup}")
    if not 0.0 <= args.dead_fraction < 1.0:
        parser.error(f"--dead-fraction must be in [0, 1), got {args.dead_fraction}")
    if args.k > args.dict_size:
        parser.error(f"--k ({args.k}) must be <= --dict-size ({args.dict_size})")
    if args.sparse_activations and args.peer != "sae-lens":
        parser.error("--sparse-activations applies to --peer sae-lens only")
    if args.device != "cpu" and args.peer != "eai-sparsify":
        parser.error("--device applies to --peer eai-sparsify only")
    if args.transcoder and args.peer != "eai-sparsify":
        parser.error("--transcoder applies to --peer eai-sparsify only")
    return args


def make_pool(torch, args: argparse.Namespace, offset: int = 0) -> list:
    generator = torch.Generator().manual_seed(args.seed + 100 * offset)
    return [
        (torch.randn(args.batch, args.d_in, generator=generator, dtype=torch.float32)
         * args.scale).to(getattr(args, "device", "cpu"))
        for _ in range(POOL_BATCHES)
    ]


def dead_latent_ids(torch, args: argparse.Namespace):
    n_dead = round(args.dead_fraction * args.dict_size)
    generator = torch.Generator().manual_seed(args.seed + 1)
    return torch.randperm(args.dict_size, generator=generator)[:n_dead]


def killing_bias(torch, pool: list, b_dec, W_enc_d_by_f) -> float:
    """An encoder bias far below every pre-activation seen on the pool (W_enc as [d_in, d_sae])."""
    with torch.no_grad():
        largest = max(float(((x - b_dec) @ W_enc_d_by_f).abs().max()) for x in pool)
    return -(3.0 * largest + 10.0)


def build_dictionary_learning(torch, args, pool, dead_ids):
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer

    trainer = TopKTrainer(
        # total run length: only shapes the LR schedule (1000 warm-up steps by default)
        steps=100_000,
        activation_dim=args.d_in,
        dict_size=args.dict_size,
        k=args.k,
        layer=0,
        lm_name="synthetic",
        dict_class=AutoEncoderTopK,
        seed=args.seed,
        device="cpu",
    )
    if len(dead_ids):
        # step 0 sets b_dec to the geometric median of the batch: bound the pre-activations
        # generously
        ae = trainer.ae
        bias = killing_bias(torch, pool, pool[0].mean(0), ae.encoder.weight.detach().T)
        with torch.no_grad():
            ae.encoder.bias[dead_ids] = bias
        trainer.num_tokens_since_fired[dead_ids] = trainer.dead_feature_threshold

    def step(index: int, x) -> None:
        trainer.update(index, x)

    def dead_count() -> int:
        return int((trainer.num_tokens_since_fired >= trainer.dead_feature_threshold).sum())

    def auxk_loss() -> float:  # -1 when the last step ran no AuxK
        return float(trainer.pre_norm_auxk_loss)

    return step, dead_count, auxk_loss


def build_sae_lens(torch, args, pool, dead_ids):
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=args.d_in,
            d_sae=args.dict_size,
            k=args.k,
            dtype="float32",
            device="cpu",
            use_sparse_activations=args.sparse_activations,
        )
    )
    total_steps = 100_000
    # as sae_lens.synthetic.training.train_toy_sae builds it (constant LR 3e-4, no wandb)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_steps * args.batch,
        train_batch_size_samples=args.batch,
        device="cpu",
        lr=3e-4,
        lr_end=3e-4,
        lr_scheduler_name="constant",
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    if len(dead_ids):
        W_enc = sae.W_enc.detach()  # [d_in, d_sae]
        bias = killing_bias(torch, pool, sae.b_dec.detach(), W_enc)
        with torch.no_grad():
            sae.b_enc[dead_ids] = bias
        trainer.n_forward_passes_since_fired[dead_ids] = trainer_cfg.dead_feature_window + 1

    last_output = {}

    def step(index: int, x) -> None:
        # the body of SAETrainer.fit() with wandb logging off (its checkpointing is a no-op here)
        trainer.maybe_reset_sparsity()
        last_output["step"] = trainer.step(x)
        trainer._checkpoint_if_needed()
        trainer.n_training_steps += 1

    def dead_count() -> int:
        return int(trainer.dead_neurons.sum())

    def auxk_loss() -> float:  # 0 when the last step ran no AuxK
        return float(last_output["step"].losses["auxiliary_reconstruction_loss"])

    return step, dead_count, auxk_loss


def build_sparsify(torch, args, pool, dead_ids):
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.config import TrainConfig

    torch.manual_seed(args.seed)
    config = SparseCoderConfig(num_latents=args.dict_size, k=args.k, transcode=args.transcoder)
    sae = SparseCoder(args.d_in, config, device=args.device, dtype=torch.float32)
    train_cfg = TrainConfig(config)
    # a transcoder's targets: a second pool, one per input batch
    targets = ({id(x): y for x, y in zip(pool, make_pool(torch, args, offset=1))}
               if args.transcoder else {})
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (sae.num_latents / 2**14) ** 0.5)
    tokens_since_fired = torch.zeros(args.dict_size, dtype=torch.long, device=args.device)
    if len(dead_ids):
        bias = killing_bias(torch, pool, sae.b_dec.detach(), sae.encoder.weight.detach().T)
        with torch.no_grad():
            sae.encoder.bias[dead_ids] = bias
        tokens_since_fired[dead_ids] = train_cfg.dead_feature_threshold + 1
    last = {}

    def step(index: int, x) -> None:
        # sparsify/trainer.py's per-step work for one autoencoding hook point (no grad accumulation)
        if not args.transcoder:  # sparsify's trainer keeps only an autoencoder's decoder unit-norm
            sae.set_decoder_norm_to_unit_norm()
        dead_mask = tokens_since_fired > train_cfg.dead_feature_threshold
        out = sae(x, targets.get(id(x)), dead_mask=dead_mask)
        loss = out.fvu + train_cfg.auxk_alpha * out.auxk_loss
        loss.backward()
        if not args.transcoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            fired = torch.zeros(args.dict_size, dtype=torch.bool, device=args.device)
            fired[out.latent_indices.flatten()] = True
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[fired] = 0
        last["auxk"] = float(out.auxk_loss)  # (on CUDA this waits for the step to finish)

    def dead_count() -> int:
        return int((tokens_since_fired > train_cfg.dead_feature_threshold).sum())

    def auxk_loss() -> float:
        return last.get("auxk", -1.0)

    return step, dead_count, auxk_loss


def reference_gemm_ms(torch, args: argparse.Namespace, repeats: int = 5) -> float:
    """Median time of one dense [batch, d_in] x [d_in, dict_size] float32 GEMM: this machine's speed
    right now."""
    generator = torch.Generator().manual_seed(args.seed + 2)
    x = torch.randn(args.batch, args.d_in, generator=generator)
    weight = torch.randn(args.dict_size, args.d_in, generator=generator)
    torch.nn.functional.linear(x, weight)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2)


def uncontended_figures(times: list[float], cpu_times: list[float],
                        args: argparse.Namespace) -> dict:
    clean = [wall for wall, cpu in zip(times, cpu_times) if cpu >= 0.9 * args.threads * wall]
    figures = {"uncontended_steps": len(clean)}
    if clean:
        median = statistics.median(clean)
        figures.update(uncontended_step_ms=round(1000 * median, 2),
                       uncontended_tokens_per_s=round(args.batch / median, 1))
    return figures


def peer_version(peer: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(peer)
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = {
        "peer": args.peer,
        "version": peer_version(args.peer),
        "tokens_per_s": None,
        "step_ms": None,
        "d_in": args.d_in,
        "dict_size": args.dict_size,
        "k": args.k,
        "batch": args.batch,
        "dead_fraction": args.dead_fraction,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "seed": args.seed,
    }
    if args.peer == "sae-lens":
        result["use_sparse_activations"] = args.sparse_activations
    try:
        import torch

        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        result["torch"] = torch.__version__
        result["reference_gemm_ms"] = reference_gemm_ms(torch, args)
        pool = make_pool(torch, args)
        dead_ids = dead_latent_ids(torch, args)
        build = {"dictionary-learning": build_dictionary_learning, "sae-lens": build_sae_lens,
                 "eai-sparsify": build_sparsify}[args.peer]
        step, dead_count, auxk_loss = build(torch, args, pool, dead_ids)

        for index in range(args.warmup):
            step(index, pool[index % POOL_BATCHES])
        times, cpu_times = [], []
        load_before = os.getloadavg()[0]
        cpu_start = time.process_time()
        for index in range(args.warmup, args.warmup + args.steps):
            x = pool[index % POOL_BATCHES]
            start, cpu_step_start = time.perf_counter(), time.process_time()
            step(index, x)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_step_start)

        cpu_seconds = time.process_time() - cpu_start
        load_after = os.getloadavg()[0]
        total = sum(times)
        result.update(
            tokens_per_s=round(args.batch * args.steps / total, 1),
            step_ms=round(1000 * total / args.steps, 2),
            step_ms_median=round(1000 * statistics.median(times), 2),
            step_ms_min=round(1000 * min(times), 2),
            tokens_per_s_best=round(args.batch / min(times), 1),
            # contention check: cpu_ms_per_step ~ threads * step_ms when the peer had its cores to
            # itself
            cpu_ms_per_step=round(1000 * cpu_seconds / args.steps, 2),
            # steps during which this process got ~all its threads (process CPU time >= 0.9 *
            # threads * wall): on a shared machine their median is the uncontended figure
            **uncontended_figures(times, cpu_times, args),
            loadavg_1min=[round(load_before, 2), round(load_after, 2)],
            dead_latents_requested=len(dead_ids),
            dead_latents_measured=dead_count(),
            last_auxk_loss=round(auxk_loss(), 6),
        )
    except Exception as error:  # report, don't crash: the caller parses one JSON line
        message = str(error).strip().splitlines()
        result["error"] = f"{type(error).__name__}: {message[0][:160] if message else ''}"
        frames = traceback.extract_tb(error.__traceback__)[-4:]
        result["where"] = [f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in frames]
        print(json.dumps(result), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

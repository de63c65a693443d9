"""Same-batches quality against the peers: one cached activation set and one batch order, read by
this toolkit's trainer and by the nearest peer's trainers, every dictionary judged by this
toolkit's one code path.

    python bench/quality.py [--architecture topk|batch_topk|matryoshka|transcoder]
        [--tokens 150000 --steps 600 --batch 2048] [--peers ...] [--loss-batches 16]
        [--out bench/results/quality]

1. SmolLM2 layer 15, the quickstart's way (ctx 128, first token dropped, tokens above 10x their
   batch's median dropped): the residual for the SAEs, the MLP's input and output for the
   transcoder; `--tokens` from the texts after the first `--eval-texts`; one batch order
   (`--steps` x `--batch`, a permutation per epoch); saved in `--out` (reused when there).
2. Ours on those batches, the quickstart's settings (lr 1e-3, 10% warmup, decay over the last 20%,
   AuxK): TopK, BatchTopK, Matryoshka BatchTopK (nested widths 1/8, 1/4, 1/2, 1 of the latents)
   or a TopK skip transcoder. Peers, each in its own venv (`bench/setup_peers.sh`), saves read
   through `formats`: sparsify (`bench/peer_train.py`: its defaults, "signum", and "adam" with
   10% warmup and AuxK 1/32) for TopK and the transcoder; SAELens (`bench/peer_train_saelens.py`,
   its `SAETrainer` with its defaults) for TopK, BatchTopK and Matryoshka.
3. Judged alike: FVU on 8,192 held-out tokens (all of them, and without the ones above 10x their
   batch's median), L0, dead latents (never firing there), and on `--loss-batches` batches of 16
   held-out texts the CE the dictionary adds (dCE) and KL(clean || patched), each context's first
   token unpatched; mean +- standard error over the batches. Prints a table; writes
   `results.json` (per architecture).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PEERS = Path.home() / ".cache/dictionary_learning/peers"
VENVS = {"sparsify": "eai-sparsify", "saelens": "sae-lens"}
# each architecture's peers (library:variant) and our trainer
PEERS_OF = {"topk": "sparsify:signum,sparsify:adam,saelens:topk",
            "batch_topk": "saelens:batchtopk", "matryoshka": "saelens:matryoshka",
            "transcoder": "sparsify:signum,sparsify:adam"}
MATRYOSHKA_FRACTIONS = [1 / 8, 1 / 8, 1 / 4, 1 / 2]


def mean_and_error(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def collect(data: Path, buffer, tokens: int, steps: int, batch: int) -> dict[str, torch.Tensor]:
    """`tokens` rows from the buffer (with their targets for a transcoder) and one batch order,
    saved to `data` (read back when there)."""
    from safetensors.torch import load_file, save_file

    if data.exists():
        return load_file(data)
    taken = buffer.take(tokens)
    stored = ({"activations": taken[0], "targets": taken[1]} if isinstance(taken, tuple)
              else {"activations": taken})
    print(f"filter: {buffer.filtered.line()}", file=sys.stderr)
    rows = stored["activations"].shape[0]
    generator = torch.Generator().manual_seed(0)
    per_epoch = rows // batch
    epochs = -(-steps // per_epoch)
    stored["order"] = torch.cat([torch.randperm(rows, generator=generator)
                                 [:per_epoch * batch].view(per_epoch, batch)
                                 for _ in range(epochs)])[:steps]
    save_file({name: tensor.contiguous() for name, tensor in stored.items()}, data)
    return stored


def our_trainer(architecture: str, args, d_in: int, point) -> dict:
    from dictionary_learning import trainers as t

    common = dict(activation_dim=d_in, dict_size=args.d_sae, k=args.k, lr=1e-3,
                  steps=args.steps, warmup_steps=min(100, args.steps // 10),
                  decay_start=int(args.steps * 0.8), seed=0, layer=15, lm_name="smollm2-135m",
                  submodule_name=str(point))
    if architecture == "topk":
        return dict(trainer=t.TopKTrainer, dead_feature_threshold=200_000,
                    encoder_dtype="auto", **common)
    if architecture == "transcoder":
        return dict(trainer=t.TopKTrainer, dead_feature_threshold=200_000, output_dim=d_in,
                    transcoder=True, skip=True, encoder_dtype="auto", **common)
    if architecture == "batch_topk":
        return dict(trainer=t.BatchTopKTrainer, dead_feature_threshold=200_000, **common)
    return dict(trainer=t.MatryoshkaBatchTopKTrainer, dead_feature_threshold=200_000,
                group_fractions=MATRYOSHKA_FRACTIONS, **common)


def train_peer(peer: str, folder: Path, data: Path, args) -> None:
    """Runs the peer's training script in its venv; the save lands in `folder`."""
    library, variant = peer.split(":")
    python = Path(args.peers_dir) / VENVS[library] / "bin" / "python"
    if library == "sparsify":
        # Adam as a user would set it for a run this short: 10% warmup (its default, 1,000
        # steps, is longer than the run) and AuxK at 1/32 (its default: none)
        extra = (["--warmup-steps", str(max(1, args.steps // 10)), "--auxk-alpha", "0.03125"]
                 if variant == "adam" else [])
        if args.architecture == "transcoder":
            extra.append("--skip")
        command = [str(python), str(HERE / "peer_train.py"), "--optimizer", variant,
                   "--num-latents", str(args.d_sae), "--out", str(folder), *extra]
    else:
        widths = [round(args.d_sae * sum(MATRYOSHKA_FRACTIONS[:i + 1]))
                  for i in range(len(MATRYOSHKA_FRACTIONS))]
        command = [str(python), str(HERE / "peer_train_saelens.py"), "--architecture", variant,
                   "--d-sae", str(args.d_sae), "--widths", ",".join(map(str, widths)),
                   "--out", str(folder)]
    done = subprocess.run([*command, "--data", str(data), "--k", str(args.k)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{peer} failed:\n{done.stderr[-3000:]}")
    print(done.stdout.strip(), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=sorted(PEERS_OF), default="topk")
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--peers", default=None,
                        help="library:variant, comma-separated (default: the architecture's: "
                        f"{PEERS_OF}; empty: none)")
    parser.add_argument("--peers-dir", default=str(PEERS))
    parser.add_argument("--eval-texts", type=int, default=300)
    parser.add_argument("--loss-batches", type=int, default=16)
    parser.add_argument("--out", default="bench/results/quality")
    args = parser.parse_args()

    from dictionary_learning import ActivationBuffer, hook, load_dictionary, load_model
    from dictionary_learning.data import text_source
    from dictionary_learning.evaluation import evaluate, patched_losses
    from dictionary_learning.formats import load as load_format
    from dictionary_learning.models import dtype_from_name
    from dictionary_learning.tracing import token_mask
    from dictionary_learning.training import trainSAE

    transcoder = args.architecture == "transcoder"
    out = Path(args.out)
    # the TopK runs keep the folder layout of the first version of this bench
    runs = out if args.architecture == "topk" else out / args.architecture
    runs.mkdir(parents=True, exist_ok=True)
    model = load_model("smollm2-135m", dtype=dtype_from_name("auto", "cpu"))
    points = ((hook(model, 15, "mlp_in"), hook(model, 15, "mlp_out")) if transcoder
              else (hook(model, 15, "resid"),))
    reading = dict(io="in_to_out") if transcoder else {}
    where = points if transcoder else points[0]
    texts = text_source(None, repeat=True)
    held_out = list(itertools.islice(texts, args.eval_texts))
    settings = dict(ctx_len=128, refresh_batch_size=32, dtype=torch.float32, remove_bos=True,
                    **reading)
    data_dir = out / "transcoder" if transcoder else out
    stored = collect(data_dir / "activations.safetensors",
                     ActivationBuffer(texts, model, where, n_ctxs=256, out_batch_size=4096,
                                      max_activation_norm_multiple=10, **settings),
                     args.tokens, args.steps, args.batch)
    activations, order = stored["activations"], stored["order"]
    targets = stored.get("targets")

    def batch(rows: torch.Tensor):
        return activations[rows] if targets is None else (activations[rows], targets[rows])

    saes = {}
    ours = runs / "ours" / "trainer_0"
    if not (ours / "config.json").exists():
        # the scale is estimated on the first 8 batches, read once more: training then sees
        # exactly the peers' batches
        trainSAE((batch(rows) for rows in itertools.chain(order[:8], order)),
                 [our_trainer(args.architecture, args, activations.shape[1], points[0])],
                 args.steps, save_dir=runs / "ours", normalize_activations="d_model",
                 normalization_batches=8, progress=False)
    saes[f"this toolkit ({args.architecture}, quickstart recipe)"] = load_dictionary(ours)[0]
    peers = PEERS_OF[args.architecture] if args.peers is None else args.peers
    for peer in filter(None, peers.split(",")):
        library, variant = peer.split(":")
        folder = runs / f"{library}_{variant}"
        saved = folder / "layers" if library == "sparsify" else folder
        if not (saved / "cfg.json").exists():
            train_peer(peer, folder, data_dir, args)
        saes[peer] = load_format(saved, library, model_name="smollm2-135m")[0]

    eval_buffer = ActivationBuffer(iter(held_out), model, where, n_ctxs=64, out_batch_size=2048,
                                   **settings)
    taken = eval_buffer.take(8192)
    held_out_rows = (list(zip(*(side.split(2048) for side in taken)))
                     if isinstance(taken, tuple) else taken.split(2048))
    results = {}
    for name, sae in saes.items():
        metrics = evaluate(sae, iter(held_out_rows), n_batches=len(held_out_rows), progress=False)
        dce, kl = [], []
        for b in range(args.loss_batches):
            losses = patched_losses(held_out[16 * b: 16 * b + 16], model, sae, points, 128,
                                    patch_mask_fn=lambda encoding: token_mask(encoding, True),
                                    progress=False)
            dce.append(losses["ce_patched"] - losses["ce_clean"])
            kl.append(losses["kl_patched"])
        results[name] = {"fvu_all_tokens": metrics["fvu_all_tokens"],
                         "fvu_typical_tokens": metrics["fvu_typical_tokens"],
                         "l0": metrics["l0"], "dead": 1 - metrics["frac_alive"],
                         "dce": mean_and_error(dce), "kl": mean_and_error(kl),
                         "per_batch_dce": dce}
    print(f"\nSmolLM2 {', '.join(map(str, points))} ({args.architecture}), "
          f"{activations.shape[0]:,} collected tokens, {args.steps} steps x {args.batch} (the "
          f"same batches for all), {args.d_sae} latents, k {args.k}; judged on 8,192 held-out "
          f"tokens and {args.loss_batches} batches of 16 held-out texts")
    print("| trainer | FVU all | FVU typical | L0 | dead | dCE (nats) | KL |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['fvu_all_tokens']:.4f} | {r['fvu_typical_tokens']:.4f} | "
              f"{r['l0']:.1f} | {r['dead']:.1%} | {r['dce'][0]:.4f} +- {r['dce'][1]:.4f} | "
              f"{r['kl'][0]:.4f} +- {r['kl'][1]:.4f} |")
    (runs / "results.json").write_text(json.dumps(results, indent=1))
    print(f"written to {runs / 'results.json'}")


if __name__ == "__main__":
    main()

"""Attribution graphs from this toolkit's transcoders: train a BatchTopK transcoder on every SmolLM2
layer (MLP input after its norm -> MLP output) from one model pass per batch, export them as a
circuit-tracer transcoder set, and let circuit-tracer build an attribution graph for a prompt with
them, offline, reporting its replacement and completeness scores.

    bash bench/setup_peers.sh circuit-tracer     # circuit-tracer 0.5.0 in a venv of its own
    python demos/attribution_graph.py            # the README's run: training took 28 minutes
    python demos/attribution_graph.py --steps 60 --tokens-per-step 512 --prompt "..."   # quicker

The README's run: the defaults, 2026-12-02, on a 2-core AMD EPYC shared with other jobs; loading
the set into circuit-tracer then took 3.6 s and the attribution 17 s.

BatchTopK transcoders because circuit-tracer 0.5.0 reads ReLU and JumpReLU transcoders only, and a
BatchTopK dictionary's inference rule (codes above one learned threshold) is exactly a JumpReLU
(`formats.circuit_tracer`). circuit-tracer pins transformers 4.57 (this toolkit uses 5): it runs in
its own venv through `demos/circuit_tracer_peer.py`, which also hands transformers 4.57 a corrected
view of the model folder (4.57 misreads a transformers-5 config.json's RoPE base and tokenizer
class, silently for the former).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dictionary_learning import ActivationBuffer, default_corpus, hook, load_model
from dictionary_learning.formats import export
from dictionary_learning.models import d_model, n_layers
from dictionary_learning.models.loading import smollm2_path
from dictionary_learning.trainers import BatchTopKTrainer
from dictionary_learning.training import trainSAE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.peers import peers_dir  # noqa: E402

MODEL = "smollm2-135m"  # the peer reads the same weights from smollm2_path()


def parser() -> argparse.ArgumentParser:
    """The demo's options; the defaults are the settings of the README's figures."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps (default %(default)s)")
    p.add_argument("--tokens-per-step", type=int, default=1024,
                   help="activation pairs per training step (default %(default)s)")
    p.add_argument("--dict-size", type=int, default=1536,
                   help="features per transcoder (default %(default)s)")
    p.add_argument("--k", type=int, default=24,
                   help="BatchTopK's mean active features per token (default %(default)s)")
    p.add_argument("--prompt", default="The capital of France is the city of",
                   help="the prompt to attribute (default %(default)r)")
    p.add_argument("--out", default="runs/circuit_tracer",
                   help="where the transcoders, the circuit-tracer set, the graph files and "
                   "attribution.json go (default %(default)s)")
    p.add_argument("--max-feature-nodes", type=int, default=1024,
                   help="circuit-tracer's cap on feature nodes in the graph (default %(default)s)")
    p.add_argument("--reuse", action="store_true",
                   help="skip training when --out already holds the transcoders")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = Path(args.out).resolve()
    peer_python = peers_dir() / "circuit-tracer" / "bin" / "python"
    if not peer_python.exists():
        sys.exit("circuit-tracer's venv is missing: run `bash bench/setup_peers.sh circuit-tracer` "
                 f"first (expected {peer_python})")

    started = time.perf_counter()
    model = load_model(MODEL)
    layers = n_layers(model)
    trained_before = all((out / "transcoders" / f"trainer_{i}" / "ae.pt").exists()
                         for i in range(layers))
    points = {f"mlp_{i}": (hook(model, i, "mlp_in"), hook(model, i, "mlp_out"))
              for i in range(layers)}
    buffer = ActivationBuffer(default_corpus(repeat=True), model, points, n_ctxs=64, ctx_len=128,
                              refresh_batch_size=16, out_batch_size=args.tokens_per_step,
                              remove_bos=True,
                              max_activation_norm_multiple=10)
    configs = [dict(trainer=BatchTopKTrainer, activation_dim=d_model(model),
                    dict_size=args.dict_size, k=args.k, transcoder=True, lr=None, steps=args.steps,
                    warmup_steps=max(1, args.steps // 10), seed=i, layer=i, lm_name=MODEL,
                    submodule_name=f"mlp_{i}", dead_feature_threshold=200_000,
                    threshold_start_step=max(1, args.steps // 4), threshold_beta=0.99)
               for i in range(layers)]
    if not (args.reuse and trained_before):
        trainSAE(buffer, configs, args.steps, save_dir=out / "transcoders",
                 normalize_activations="d_model", log_steps=max(1, args.steps // 10))
        print(f"trained {layers} transcoders ({args.steps} steps of {args.tokens_per_step} tokens) "
              f"in {time.perf_counter() - started:.0f} s")

    transcoder_set = export(out / "transcoders", out / "circuit_tracer_set", to="circuit-tracer")
    print(f"circuit-tracer transcoder set: {transcoder_set}")
    peer_script = Path(__file__).with_name("circuit_tracer_peer.py")
    command = [str(peer_python), str(peer_script), "attribute",
               "--transcoders", str(transcoder_set), "--model", str(smollm2_path()),
               "--prompt", args.prompt, "--max-feature-nodes", str(args.max_feature_nodes),
               "--graph-dir", str(out / "graphs"), "--slug", "smollm2-demo"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"circuit-tracer failed:\n{result.stderr[-4000:]}")
    stdout = result.stdout  # its last print is the report
    last_print = stdout if stdout.startswith("{") else stdout[stdout.rfind("\n{\n") + 1:]
    report = json.loads(last_print)
    (out / "attribution.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({key: report[key] for key in report
                      if "score" in key or key in ("nodes", "edges")}, indent=2))
    print(f"graph files for circuit-tracer's frontend in {out / 'graphs'}; full report in "
          f"{out / 'attribution.json'}")


if __name__ == "__main__":
    main()

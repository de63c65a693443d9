"""Build a circuit-tracer attribution graph from a local per-layer transcoder set and a local
Hugging Face model.

Runs INSIDE the circuit-tracer peer venv (`bash bench/setup_peers.sh circuit-tracer`), never imports
dictionary_learning (that venv has transformers 4.57, ours has 5.x), and never touches the network.

    PY=~/.cache/dictionary_learning/peers/circuit-tracer/bin/python
    # dictionary_learning.models.loading.smollm2_path():
    MODEL=~/.cache/dictionary_learning/smollm2-135m-instruct

    # a throwaway transcoder set (random weights, thresholds calibrated on one sentence) to try
    # the pipeline on
    $PY demos/circuit_tracer_peer.py random --model $MODEL --out /tmp/tc_random --d-tc 256 \\
        --activation relu

    # does circuit-tracer encode / decode the set the way a plain forward hook says it should?
    $PY demos/circuit_tracer_peer.py check --transcoders /tmp/tc_random --model $MODEL

    # attribution graph, replacement / completeness scores, top features, optional frontend files
    $PY demos/circuit_tracer_peer.py attribute --transcoders /tmp/tc_random --model $MODEL \\
        --prompt "The capital of France is" --graph-dir /tmp/ct_graphs

The transcoder folder (circuit-tracer's `model_kind: transcoder_set` layout):
    config.yaml              model_kind: transcoder_set, feature_input_hook: mlp.hook_in,
                             feature_output_hook: mlp.hook_out,
                             optional activation: relu | jumprelu | topk,
                             k: <int> (topk only), optional model_name, scan
    layer_{i}.safetensors    i = 0 .. n_layers-1, exactly these keys (the loader is a strict
                             load_state_dict): W_enc [d_tc, d_model], b_enc [d_tc],
                             W_dec [d_tc, d_model], b_dec [d_model],
                             optional W_skip [d_model, d_model] (applied as x @ W_skip.T),
                             optional activation_function.threshold [d_tc] (JumpReLU: x * (x >
                             threshold))
circuit-tracer 0.5.0 reads neither `activation` nor `k` from config.yaml (TopK loading came later,
upstream PR #94): a file with a threshold is JumpReLU, any other is ReLU. This script applies
`activation: topk` itself, with circuit-tracer's own TopK module (top k of the raw pre-activations,
no ReLU first), so TopK sets work on 0.5.0 too. Measured here (2 shared CPU threads, SmolLM2-135M,
30 layers, 8-token prompt, ~15 features per token and layer, ~3,600 active features): loading 1.4-3
s, attribute() 10-25 s at --max-feature-nodes 512 and 38 s with every feature node, for d_tc 256 and
1024 alike; Python and imports add ~8 s.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: nothing here may reach the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the peer venv's packages are imported where used, so --help needs none of them
    import torch

LAYER_KEYS = {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "activation_function.threshold"}


# --------------------------------------------------------------------------------------------------
# The model folder, as transformers 4.57 (circuit-tracer's pin) must see it
# --------------------------------------------------------------------------------------------------
def transformers4_view(model_dir: Path) -> Path:
    """A folder transformers 4.57 reads correctly; model_dir itself when it already does.

    A folder saved by transformers 5 differs in two ways that 4.57 gets wrong: config.json keeps
    RoPE's base in `rope_parameters` (4.57 ignores it and silently uses rope_theta 10000, SmolLM2
    needs 100000), and tokenizer_config.json names `TokenizersBackend` (4.57: "Tokenizer class
    TokenizersBackend does not exist"). The view links every file and rewrites those two.
    """
    model_dir = model_dir.resolve()
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer_config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = (json.loads(tokenizer_config_path.read_text())
                        if tokenizer_config_path.exists() else {})
    rope = config.get("rope_parameters")
    needs_rope = isinstance(rope, dict) and "rope_theta" not in config
    needs_tokenizer = tokenizer_config.get("tokenizer_class") == "TokenizersBackend"
    if not (needs_rope or needs_tokenizer):
        return model_dir
    if needs_rope:
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only default RoPE can be rewritten for transformers 4, got {rope}")
        config["rope_theta"] = rope["rope_theta"]
        config["rope_scaling"] = None
        del config["rope_parameters"]
    if needs_tokenizer:
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    digest = hashlib.sha1(str(model_dir).encode()).hexdigest()[:8]
    view = (Path(tempfile.gettempdir()) / "circuit_tracer_peer"
            / f"{model_dir.name}-{digest}-transformers4")
    view.mkdir(parents=True, exist_ok=True)
    for source in model_dir.iterdir():
        target = view / source.name
        if (source.name in ("config.json", "tokenizer_config.json") or target.exists()
                or target.is_symlink()):
            continue
        target.symlink_to(source)
    for name, content in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if name == "tokenizer_config.json" and not tokenizer_config:
            continue
        temporary = view / f".{name}.tmp"
        temporary.write_text(json.dumps(content, indent=2))
        temporary.replace(view / name)
    return view


# --------------------------------------------------------------------------------------------------
# Loading the transcoder set
# --------------------------------------------------------------------------------------------------
def read_config(transcoder_dir: Path) -> dict:
    import yaml

    config = yaml.safe_load((transcoder_dir / "config.yaml").read_text())
    if config.get("model_kind") != "transcoder_set":
        raise ValueError(f"{transcoder_dir}/config.yaml: model_kind must be transcoder_set, "
                         f"got {config.get('model_kind')!r}")
    for key in ("feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise ValueError(f"{transcoder_dir}/config.yaml lacks {key}")
    activation = config.get("activation")
    if activation not in (None, "relu", "jumprelu", "topk"):
        raise ValueError(f"activation must be relu, jumprelu or topk, got {activation!r}")
    if activation == "topk" and not isinstance(config.get("k"), int):
        raise ValueError("activation topk needs an integer k in config.yaml, got "
                         f"{config.get('k')!r}")
    return config


def layer_paths(transcoder_dir: Path) -> dict[int, str]:
    from safetensors import safe_open

    paths = {int(p.stem.split("_")[1]): str(p) for p in transcoder_dir.glob("layer_*.safetensors")}
    if not paths or set(paths) != set(range(len(paths))):
        raise ValueError(f"{transcoder_dir}: need layer_0 .. layer_(n-1).safetensors, found layers "
                         f"{sorted(paths)}")
    for path in paths.values():
        with safe_open(path, framework="pt") as f:
            extra = set(f.keys()) - LAYER_KEYS
        # circuit-tracer's strict load_state_dict would refuse them with a less helpful message
        if extra:
            raise ValueError(f"{path}: keys {sorted(extra)} are not read by circuit-tracer "
                             f"(allowed: {sorted(LAYER_KEYS)})")
    return paths


def load_transcoders(transcoder_dir: Path, device: torch.device, dtype: torch.dtype):
    """circuit-tracer's TranscoderSet for the folder, with `activation: topk` applied (0.5.0
    ignores it)."""
    from circuit_tracer.transcoder.activation_functions import JumpReLU, TopK
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    transcoder_dir = transcoder_dir.resolve()
    config = read_config(transcoder_dir)
    transcoders = load_transcoder_set(
        layer_paths(transcoder_dir),
        scan=config.get("scan", str(transcoder_dir)),
        feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"],
        device=device,
        dtype=dtype,
        lazy_encoder=False,  # what ReplacementModel.from_pretrained uses
        lazy_decoder=True,
    )
    activation = config.get("activation")
    for transcoder in transcoders:
        is_jumprelu = isinstance(transcoder.activation_function, JumpReLU)
        if activation == "jumprelu" and not is_jumprelu:
            raise ValueError(f"activation jumprelu but layer {transcoder.layer_idx} has no "
                             "activation_function.threshold")
        if activation in ("relu", "topk") and is_jumprelu:
            raise ValueError(f"activation {activation} but layer {transcoder.layer_idx} has a "
                             "threshold")
        if activation == "topk":
            transcoder.activation_function = TopK(config["k"])
    return transcoders, config


def load_replacement_model(transcoder_dir: Path, model_dir: Path, device: torch.device,
                           dtype: torch.dtype):
    from circuit_tracer import ReplacementModel

    transcoders, config = load_transcoders(transcoder_dir, device, dtype)
    model = ReplacementModel.from_pretrained_and_transcoders(
        model_name=str(transformers4_view(model_dir)),
        transcoders=transcoders,
        backend="nnsight",
        device=device,
        dtype=dtype,
    )
    # model.transcoders is an nnsight Envoy around the same TranscoderSet
    return model, transcoders, config


# --------------------------------------------------------------------------------------------------
# random: a throwaway set to try the pipeline on
# --------------------------------------------------------------------------------------------------
CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is "
    "the capital of Germany. She opened the door, looked outside and saw that it was raining again."
)


def mlp_activations(model_dir: Path, text: str | torch.Tensor) -> tuple[list[torch.Tensor],
                                                                        list[torch.Tensor]]:
    """Per layer, the MLP's input (post_attention_layernorm output) and output on text or token ids
    [n_pos], by plain forward hooks on the Hugging Face model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    view = transformers4_view(model_dir)
    if isinstance(text, str):
        text = AutoTokenizer.from_pretrained(view)(text, return_tensors="pt").input_ids[0]
    model = AutoModelForCausalLM.from_pretrained(view, dtype=torch.float32).eval()
    inputs, outputs, handles = [], [], []
    for layer in model.model.layers:
        norm = layer.post_attention_layernorm
        handles.append(norm.register_forward_hook(lambda m, i, o: inputs.append(o[0])))
        handles.append(layer.mlp.register_forward_hook(lambda m, i, o: outputs.append(o[0])))
    with torch.no_grad():
        model(text[None])
    for handle in handles:
        handle.remove()
    return inputs, outputs


def write_random(args) -> None:
    """One layer_{i}.safetensors per layer with unit-norm random encoder rows and thresholds set so
    that about --l0 features fire per token on a calibration sentence; decoder rows random, scaled
    to the MLP output norm."""
    import torch
    import yaml
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(args.seed)
    inputs, outputs = mlp_activations(args.model, CALIBRATION_TEXT)
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    d_tc, l0 = args.d_tc, args.l0
    for layer, (x, y) in enumerate(zip(inputs, outputs)):
        d_model = x.shape[-1]
        W_enc = torch.randn(d_tc, d_model, generator=generator)
        W_enc /= W_enc.norm(dim=1, keepdim=True)
        pre = x[1:] @ W_enc.T  # [n_tokens, d_tc]; the first token's norms are atypical
        cut = torch.quantile(pre.flatten(), 1 - l0 / d_tc).item()
        W_dec = torch.randn(d_tc, d_model, generator=generator)
        W_dec *= (y[1:].norm(dim=-1).mean()
                  / (math.sqrt(l0) * max(cut, 1e-3) * W_dec.norm(dim=1, keepdim=True)))
        tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": y[1:].mean(0).clone()}
        if args.activation == "relu":
            tensors["b_enc"] = torch.full((d_tc,), -cut)
        else:
            tensors["b_enc"] = torch.zeros(d_tc)
        if args.activation == "jumprelu":
            tensors["activation_function.threshold"] = torch.full((d_tc,), cut)
        if args.skip:
            tensors["W_skip"] = 0.01 * torch.randn(d_model, d_model, generator=generator)
        save_file({k: v.to(getattr(torch, args.dtype)).contiguous() for k, v in tensors.items()},
                  str(out_dir / f"layer_{layer}.safetensors"))
    config = {
        "model_kind": "transcoder_set",
        "model_name": str(args.model),
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "activation": args.activation,
        "scan": f"random-{args.activation}-{d_tc}",
    }
    if args.activation == "topk":
        config["k"] = l0
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(json.dumps({"out": str(out_dir), "layers": len(inputs), "d_tc": d_tc, **config}))


# --------------------------------------------------------------------------------------------------
# check: circuit-tracer's features against a plain forward hook and the file's weights
# --------------------------------------------------------------------------------------------------
def check(args) -> None:
    """The activations circuit-tracer computes (get_activations) against the documented rule applied
    by hand to the MLP input read by a plain forward hook; and decode against acts @ W_dec + b_dec
    (+ x @ W_skip.T)."""
    import torch
    from safetensors import safe_open

    device, dtype = torch.device("cpu"), torch.float32
    model, transcoders, config = load_replacement_model(args.transcoders, args.model, device, dtype)
    prompt = args.prompt
    tokens = model.ensure_tokenized(prompt)
    # [n_layers, n_pos, d_tc], position 0 zeroed by circuit-tracer
    _, traced = model.get_activations(tokens)
    inputs, _ = mlp_activations(args.model, tokens)
    worst_encode, worst_decode = 0.0, 0.0
    for layer, path in layer_paths(args.transcoders.resolve()).items():
        with safe_open(path, framework="pt") as f:
            w = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
        x = inputs[layer]
        pre = x @ w["W_enc"].T + w["b_enc"]  # no b_dec subtraction
        if "activation_function.threshold" in w:
            acts = pre * (pre > w["activation_function.threshold"])  # strict >
        elif config.get("activation") == "topk":
            # top k of the raw pre-activations, no ReLU first
            top = pre.topk(config["k"], dim=-1).indices
            acts = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top))
        else:
            acts = pre.relu()
        acts[0] = 0
        worst_encode = max(worst_encode, (acts - traced[layer]).abs().max().item())
        recon = acts @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if "W_skip" in w else 0)
        ours = transcoders[layer].decode(traced[layer], x)
        worst_decode = max(worst_decode, (recon - ours).abs().max().item())
    mean_l0 = (traced[:, 1:] != 0).sum(-1).float().mean().item()
    print(json.dumps({"tokens": tokens.tolist(), "max_abs_diff_encode": worst_encode,
                      "max_abs_diff_decode": worst_decode, "mean_l0": mean_l0}))


# --------------------------------------------------------------------------------------------------
# attribute: the graph and its scores
# --------------------------------------------------------------------------------------------------
def attribute_prompt(args) -> None:
    import torch
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, compute_node_influence, prune_graph

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    timings = {}
    start = time.perf_counter()
    model, transcoders, config = load_replacement_model(args.transcoders, args.model, device, dtype)
    timings["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    graph = attribute(
        args.prompt,
        model,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
        offload=None if args.offload == "none" else args.offload,
        verbose=args.verbose,
    )
    timings["attribute_s"] = time.perf_counter() - start

    start = time.perf_counter()
    replacement, completeness = compute_graph_scores(graph)
    timings["scores_s"] = time.perf_counter() - start

    n_features = len(graph.selected_features)
    n_pos = len(graph.input_tokens)
    n_logits = len(graph.logit_targets)
    adjacency = graph.adjacency_matrix
    logit_weights = torch.zeros(adjacency.shape[0])
    logit_weights[-n_logits:] = graph.logit_probabilities
    influence = compute_node_influence(adjacency, logit_weights)
    top = torch.argsort(influence[:n_features], descending=True)[: args.top].tolist()
    top_features = []
    for row in top:
        layer, pos, index = graph.active_features[graph.selected_features[row]].tolist()
        top_features.append({
            "layer": layer, "pos": pos, "feature": index,
            "token": model.tokenizer.decode([int(graph.input_tokens[pos])]),
            "activation": graph.activation_values[graph.selected_features[row]].item(),
            "influence": influence[row].item(),
        })
    pruned = prune_graph(graph, args.node_threshold, args.edge_threshold)
    report = {
        "prompt": args.prompt,
        "tokens": [model.tokenizer.decode([int(t)]) for t in graph.input_tokens],
        "layers": graph.cfg.n_layers,
        "d_transcoder": transcoders.d_transcoder,
        "activation": config.get("activation") or "from files",
        "replacement_score": replacement,
        "completeness_score": completeness,
        "active_features": int(graph.active_features.shape[0]),
        "feature_nodes": n_features,
        "error_nodes": graph.cfg.n_layers * n_pos,
        "token_nodes": n_pos,
        "logit_nodes": n_logits,
        "logit_targets": [{"token": t.token_str, "prob": p.item()}
                          for t, p in zip(graph.logit_targets, graph.logit_probabilities)],
        "nodes": int(adjacency.shape[0]),
        "edges": int((adjacency != 0).sum()),
        "pruned_nodes": int(pruned.node_mask.sum()),
        "pruned_edges": int(pruned.edge_mask.sum()),
        "top_features": top_features,
        "timings": timings,
        "threads": torch.get_num_threads(),
    }
    if args.graph_dir:
        from circuit_tracer.utils.create_graph_files import create_graph_files

        start = time.perf_counter()
        args.graph_dir.mkdir(parents=True, exist_ok=True)
        graph.to_pt(str(args.graph_dir / f"{args.slug}.pt"))
        create_graph_files(graph, slug=args.slug, output_path=str(args.graph_dir), scan=graph.scan,
                           node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
        report["graph_files"] = sorted(p.name for p in args.graph_dir.iterdir())
        report["timings"]["graph_files_s"] = time.perf_counter() - start
    print(json.dumps(report, indent=2))


def parser() -> argparse.ArgumentParser:
    """The three commands and their options; parsing imports nothing from the peer venv."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)

    random_parser = commands.add_parser(
        "random", help="write a throwaway random transcoder set",
        description="write a throwaway random transcoder set (thresholds calibrated on one "
        "sentence)")
    random_parser.add_argument("--model", type=Path, required=True, help="local HF model folder")
    random_parser.add_argument("--out", type=Path, required=True,
                               help="the transcoder folder to write")
    random_parser.add_argument("--d-tc", type=int, default=256,
                               help="features per layer (default %(default)s)")
    random_parser.add_argument("--l0", type=int, default=16,
                               help="features firing per token (k for topk; default %(default)s)")
    random_parser.add_argument("--activation", choices=("relu", "jumprelu", "topk"), default="relu",
                               help="default %(default)s")
    random_parser.add_argument("--skip", action="store_true", help="add a W_skip")
    random_parser.add_argument("--dtype", default="float32",
                               choices=("float32", "bfloat16", "float16"),
                               help="of the saved weights (default %(default)s)")
    random_parser.add_argument("--seed", type=int, default=0, help="default %(default)s")

    helps = {"check": "compare circuit-tracer's encode / decode of a set with a plain forward hook",
             "attribute": "attribution graph, replacement / completeness scores, top features"}
    for name, text in helps.items():
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--transcoders", type=Path, required=True,
                         help="folder with config.yaml + layer_{i}.safetensors")
        sub.add_argument("--model", type=Path, required=True,
                         help="local HF model folder (config.json, model.safetensors, tokenizer "
                              "files)")
        sub.add_argument("--prompt", default="The capital of France is the city of",
                         help="default %(default)r")
    a = commands.choices["attribute"]
    a.add_argument("--max-n-logits", type=int, default=5,
                   help="most logit nodes to attribute from (default %(default)s)")
    a.add_argument("--desired-logit-prob", type=float, default=0.9,
                   help="cumulative probability the logit nodes should cover (default %(default)s)")
    a.add_argument("--batch-size", type=int, default=64,
                   help="source nodes per backward pass (default %(default)s)")
    a.add_argument("--max-feature-nodes", type=int, default=512,
                   help="cap on feature nodes in the graph (default %(default)s)")
    a.add_argument("--offload", choices=("none", "cpu", "disk"), default="none",
                   help="where circuit-tracer offloads model parts during attribution "
                   "(default %(default)s)")
    a.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model and transcoder dtype (default %(default)s)")
    a.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a.add_argument("--top", type=int, default=10,
                   help="how many top features to print (default %(default)s)")
    a.add_argument("--node-threshold", type=float, default=0.8,
                   help="prune_graph's node threshold (default %(default)s)")
    a.add_argument("--edge-threshold", type=float, default=0.98,
                   help="prune_graph's edge threshold (default %(default)s)")
    a.add_argument("--graph-dir", type=Path,
                   help="write <slug>.pt, <slug>.json, graph-metadata.json for the frontend")
    a.add_argument("--slug", default="circuit-tracer-peer",
                   help="name of the graph files (default %(default)s)")
    a.add_argument("--verbose", action="store_true", help="circuit-tracer's progress output")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    {"random": write_random, "check": check, "attribute": attribute_prompt}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

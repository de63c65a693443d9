"""dictionary_learning.circuits against saprmarks/feature-circuits' `get_circuit` (Marks et al.
2024, Sparse Feature Circuits) on one tiny model, one set of dictionaries and one set of prompts.

    python bench/circuits_vs_feature_circuits.py [--dict-size 64] [--pairs 3] [--keep DIR]

Needs the feature-circuits peer venv (`bash bench/setup_peers.sh feature-circuits`, default
~/.cache/dictionary_learning/peers/feature-circuits, or $PEERS_DIR/feature-circuits); the peer
runs through tests/peer_feature_circuits.py in a subprocess. CPU only, float32, offline; a minute
or so on two cores.

What it builds: a random 2-layer GPT-2 (width 32, 4 heads, random LayerNorm affines and biases) with
the project's byte tokenizer, saved as a Hugging Face folder; random `AutoEncoder`s (one
dict_size everywhere: upstream's jvp sizes every edge tensor by the downstream dictionary's;
unit-norm decoder columns, which both loaders keep) at embed, attn_i, mlp_i, resid_i, saved in
upstream's format with `save_dictionary`; prompt pairs of one token length with one answer token
each. Both sides load the same folders: ours with `load_model(folder)` (an nnsight 0.8
LanguageModel, float32) and `utils.load_dictionary`, theirs with nnsight 0.3.7's LanguageModel and
upstream dictionary_learning 0.1.0's `AutoEncoder.from_pretrained`.

Checks, and what they print:
  1. integrated gradients (get_circuit's method, steps 10, alpha = i / steps) with edges,
     aggregation "sum": per site the largest |ours - theirs| of the aggregated node effects
     (features and error separately) and of the per-example effects (patching_effect's,
     [b, s, F] and [b, s, 1]) relative to the largest |effect| at that site; per edge pair the
     largest difference over the upstream side's feature columns relative to the largest |edge|,
     and the downstream rows that carry edges on each side; the total effect y.
  2. attribution patching (their "attrib", our "attribution"), per-example node effects:
     a. sites at attn_i and resid_i only (tuple-valued modules: their bug does not bite), through
        a short peer-side snippet calling attribution.patching_effect directly (the runner
        requires dictionaries at every attn/mlp/resid);
     b. every site through the runner (nodes_only): there upstream's attrib is wrong wherever a
        decomposed MLP or embedding lies downstream (see tests/peer_feature_circuits.py), so only
        mlp_{L-1} and resid_{L-1} are expected to agree; the others are printed for the record.

Mapping (ours -> get_circuit):
  sites {name: (dictionary, HookPoint)}     embed, attns, mlps, resids (loading_utils.Submodule
                                            lists) + dictionaries {Submodule: dictionary}:
      "embed":  HookPoint("transformer.wte", "output", name="embed")  (embed: the token
                embedding's output; the name ends in "embed" so `edge_pairs` starts a layer there)
      "attn_i": hook(model, i, "attn_out")  = transformer.h.i.attn output[0]  (attns[i], is_tuple)
      "mlp_i":  hook(model, i, "mlp_out")   = transformer.h.i.mlp output       (mlps[i])
      "resid_i": hook(model, i, "resid")    = transformer.h.i output[0]        (resids[i], is_tuple)
  clean, patch token ids [b, s]             clean, patch prompt strings (one token length)
  metric / logit_difference(clean_answers, patch_answers) = logits[:, -1, patch] - logits[:, -1,
      clean]                                metric_fn(model), the runner's: the same difference
                                            read at lm_head's output ("unembed")
  node_state(method="ig", steps=10, ig_rule="left")
                                            patching_effect(method="ig", steps=10) (get_circuit
                                            hard-codes "ig"; its steps default 10; its path point
                                            alpha = step / steps is our "left" rule)
  state.effects.features[name] [b, s, F]    effects[submod].act   [b, s, F]
  state.effects.errors[name] [b, s]         effects[submod].resc  [b, s, 1]
  state.effects.total [b]                   total_effect [b] (nodes["y"], left per example)
  state.effects.summed().mean()             aggregation "sum": nodes[name].act [F] (summed over
                                            positions, averaged over examples), .resc [1]
  edge_effects(model, state=state, node_threshold=t, pairs=edge_pairs(sites))
                                            get_circuit(..., nodes_only=False, node_threshold=t):
      downstream nodes chosen where the per-example, per-position |node effect| > t, features and
      error alike, on both sides (ours: edges._chosen; theirs: features_by_submod =
      effects.abs() > t, passed to jvp, which backpropagates from each nonzero index)
      edge_pairs on sites ordered embed, attn_0, mlp_0, resid_0, attn_1, ... gives exactly
      get_circuit's pairs and stop-grads: (embed, attn_0, []), (embed, mlp_0, [attn_0]),
      (embed, resid_0, [attn_0, mlp_0]), (attn_0, mlp_0, []), (attn_0, resid_0, [mlp_0]),
      (mlp_0, resid_0, []), (resid_0, attn_1, []), ... (frozen = intermediate_stopgrads)
  EdgeEffects.summed() [F_d + 1, F_u + 1] (sparse; index F is the error node)
                                            edges[up][down] [F_d + 1, F_u + 1] under "sum"
                                            (summed over both positions, / batch)
      their column F (edges out of the upstream error node) is always 0 (jvp zeroes x_res.grad
      before reading it): only the feature columns are compared; ours are printed beside.
  edges[resid_{L-1}]["y"] [F + 1] is resid_{L-1}'s aggregated node effect (features, error).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNNER = ROOT / "tests" / "peer_feature_circuits.py"
D_MODEL, LAYERS, HEADS = 32, 2, 4

CLEAN = ["the key to the", "a dog by the b", "my cat is on t", "one boy in the"]
PATCH = ["the keys to th", "a dogs by the ", "my cats is on ", "one boys in th"]
CLEAN_ANSWERS = ["s", "s", "h", "e"]
PATCH_ANSWERS = ["r", "a", "e", "h"]


def peer_python() -> Path:
    base = Path(os.environ.get("PEERS_DIR") or Path.home() / ".cache/dictionary_learning/peers")
    return base / "feature-circuits" / "bin" / "python"


def site_names(layers: int) -> list[str]:
    return ["embed"] + [f"{kind}_{i}" for i in range(layers) for kind in ("attn", "mlp", "resid")]


# ------------------------------------------------------------------------------------------------
# 1. the model, dictionaries and prompts (on disk, for both sides)


def build(folder: Path, dict_size: int, pairs: int, seed: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from dictionary_learning import AutoEncoder
    from dictionary_learning.models.loading import TINY_VOCAB, byte_tokenizer
    from dictionary_learning.utils import save_dictionary

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=TINY_VOCAB, n_positions=64, n_embd=D_MODEL, n_layer=LAYERS,
                        n_head=HEADS, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial norms and biases, so a dropped affine part would show
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                parameter.copy_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
    tokenizer = byte_tokenizer(add_bos=False)
    model_dir = folder / "tiny-gpt2"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    generator = torch.Generator().manual_seed(seed + 1)
    dictionaries = {}
    for name in site_names(LAYERS):
        ae = AutoEncoder(D_MODEL, dict_size)
        with torch.no_grad():
            W = torch.randn(D_MODEL, dict_size, generator=generator)
            W = W / W.norm(dim=0, keepdim=True)  # unit decoder columns: both loaders keep them
            ae.decoder.weight.copy_(W)
            ae.encoder.weight.copy_(W.T)
            ae.encoder.bias.copy_(0.05 * torch.randn(dict_size, generator=generator))
            ae.bias.copy_(0.05 * torch.randn(D_MODEL, generator=generator))
        dictionaries[name] = str(save_dictionary(ae, folder / "dicts" / name))

    clean, patch = CLEAN[:pairs], PATCH[:pairs]
    lengths = {len(tokenizer(p).input_ids) for p in clean + patch}
    assert len(lengths) == 1, lengths
    ids = tokenizer.convert_tokens_to_ids
    return {"model_dir": str(model_dir), "family": "gpt2", "dictionaries": dictionaries,
            "clean": clean, "patch": patch,
            "clean_answer_ids": [ids(a) for a in CLEAN_ANSWERS[:pairs]],
            "patch_answer_ids": [ids(a) for a in PATCH_ANSWERS[:pairs]],
            "aggregation": "sum", "method": "ig", "steps": 10}


# ------------------------------------------------------------------------------------------------
# 2. theirs: the runner (or a snippet) in the peer venv


def peer_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def run_peer(args: list[str], tag: str) -> float:
    start = time.time()
    result = subprocess.run([str(peer_python()), *args], capture_output=True, text=True, cwd="/",
                            env=peer_env())
    seconds = time.time() - start
    if result.returncode:
        sys.exit(f"peer run {tag} failed (rc {result.returncode}):\n{result.stdout[-3000:]}\n"
                 f"{result.stderr[-6000:]}")
    return seconds


def theirs(job: dict, folder: Path, tag: str) -> tuple[dict, float]:
    from safetensors.torch import load_file

    path = folder / f"job_{tag}.json"
    job = {**job, "out": str(folder / f"out_{tag}.safetensors")}
    path.write_text(json.dumps(job))
    seconds = run_peer([str(RUNNER), str(path)], tag)
    return load_file(job["out"]), seconds


# patching_effect(method="attrib") at the given sites only, the runner's loaders and metric
ATTRIB_SNIPPET = r"""
import importlib.util, json, sys
from pathlib import Path
import torch
job = json.loads(Path(sys.argv[1]).read_text())
spec = importlib.util.spec_from_file_location("peer_runner", job["runner"])
runner = importlib.util.module_from_spec(spec); spec.loader.exec_module(runner)
sys.path.insert(0, str(runner.SOURCE))
from attribution import patching_effect
from loading_utils import Submodule
from nnsight import LanguageModel
from safetensors.torch import save_file
torch.manual_seed(0)
model = LanguageModel(job["model_dir"], dispatch=True, torch_dtype=torch.float32,
                      tokenizer=runner.tokenizer(job["model_dir"]))
model.eval()
paths = runner.PATHS[job["family"]]
blocks = runner.envoy(model, paths["layers"])
unembed = runner.envoy(model, paths["unembed"])
submods = []
for name in job["sites"]:
    kind, layer = name.split("_")
    block = blocks[int(layer)]
    module = block if kind == "resid" else runner.envoy(block, paths[kind])
    submods.append(Submodule(name, module, is_tuple=kind in ("attn", "resid")))
dictionaries = {s: runner.load_dictionary(job["dictionaries"][s.name]) for s in submods}
clean_ids = torch.tensor(job["clean_answer_ids"]); patch_ids = torch.tensor(job["patch_answer_ids"])
def metric_fn(model):
    logits = unembed.output[:, -1, :]
    return (torch.gather(logits, -1, patch_ids.view(-1, 1)).squeeze(-1)
            - torch.gather(logits, -1, clean_ids.view(-1, 1)).squeeze(-1))
out = patching_effect(job["clean"], job["patch"], model, submods, dictionaries, metric_fn,
                      method="attrib")
tensors = {"raw/y": out.total_effect.detach().clone()}
for s, effect in out.effects.items():
    tensors[f"raw/{s.name}/act"] = effect.act.detach().clone().contiguous()
    tensors[f"raw/{s.name}/resc"] = effect.resc.detach().clone().contiguous()
save_file(tensors, job["out"])
"""


def theirs_attrib_at(job: dict, sites: list[str], folder: Path) -> tuple[dict, float]:
    from safetensors.torch import load_file

    snippet = folder / "peer_attrib_at.py"
    snippet.write_text(ATTRIB_SNIPPET)
    path = folder / "job_attrib_at.json"
    job = {**job, "sites": sites, "runner": str(RUNNER),
           "out": str(folder / "out_attrib_at.safetensors")}
    path.write_text(json.dumps(job))
    seconds = run_peer([str(snippet), str(path)], "attrib_at")
    return load_file(job["out"]), seconds


# ------------------------------------------------------------------------------------------------
# 3. ours


def our_sites(model, job: dict, names: list[str]) -> dict:
    from dictionary_learning import hook
    from dictionary_learning.models.hooks import HookPoint
    from dictionary_learning.utils import load_dictionary

    points = {"embed": HookPoint("transformer.wte", "output", name="embed")}
    for i in range(LAYERS):
        points[f"attn_{i}"] = hook(model, i, "attn_out")
        points[f"mlp_{i}"] = hook(model, i, "mlp_out")
        points[f"resid_{i}"] = hook(model, i, "resid")
    return {name: (load_dictionary(job["dictionaries"][name], dtype=torch.float32)[0],
                   points[name]) for name in names}


def tokens(model, prompts: list[str]) -> torch.Tensor:
    return model.tokenizer(prompts, return_tensors="pt")["input_ids"]


# ------------------------------------------------------------------------------------------------
# 4. comparison


def rel(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def node_table(title: str, names: list[str], ours_raw: dict, theirs_raw: dict,
               ours_sum: dict | None, theirs_sum: dict | None, expected: set[str] | None = None
               ) -> float:
    """Rows per site; returns the worst relative difference over the sites expected to agree."""
    print(f"\n{title}")
    head = (f"  {'site':8s} {'max|effect|':>11s} {'ex: act':>9s} {'ex: err':>9s}")
    if ours_sum is not None:
        head += f" {'max|sum|':>9s} {'sum: act':>9s} {'sum: err':>9s}"
    print(head + ("   expected" if expected is not None else ""))
    worst = 0.0
    for name in names:
        o_act, o_err = ours_raw[name]
        t_act, t_err = theirs_raw[f"raw/{name}/act"], theirs_raw[f"raw/{name}/resc"][..., 0]
        scale = float(max(t_act.abs().max(), t_err.abs().max()))
        row = [rel(o_act, t_act, scale), rel(o_err, t_err, scale)]
        line = f"  {name:8s} {scale:11.4g} {row[0]:9.1e} {row[1]:9.1e}"
        if ours_sum is not None:
            s_act, s_err = ours_sum[name]
            u_act, u_err = theirs_sum[f"nodes/{name}/act"], theirs_sum[f"nodes/{name}/resc"][0]
            s_scale = float(max(u_act.abs().max(), u_err.abs()))
            row += [rel(s_act, u_act, s_scale), rel(s_err, u_err, s_scale)]
            line += f" {s_scale:9.4g} {row[2]:9.1e} {row[3]:9.1e}"
        if expected is not None:
            line += "   agree" if name in expected else "   (upstream bug)"
        if expected is None or name in expected:
            worst = max(worst, *row)
        print(line)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dict-size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=3, choices=(2, 3, 4))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threshold-fraction", type=float, default=0.01,
                        help="node_threshold = this times the largest per-example |node effect|")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="write the model, dictionaries and peer outputs "
                        "here (default: a temporary folder, removed)")
    parser.add_argument("--no-attrib", action="store_true", help="skip the attribution checks")
    args = parser.parse_args()
    if not peer_python().exists():
        sys.exit(f"no feature-circuits peer venv at {peer_python().parents[1]}: run "
                 "bash bench/setup_peers.sh feature-circuits")
    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from dictionary_learning import load_model
    from dictionary_learning.circuits import edge_effects, edge_pairs, node_state
    from dictionary_learning.circuits.sites import as_sites

    start = time.time()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="circuits_vs_fc_"))
    folder.mkdir(parents=True, exist_ok=True)
    timings = {}
    try:
        job = build(folder, args.dict_size, args.pairs, args.seed)
        job["steps"] = args.steps
        names = site_names(LAYERS)

        # ---- ours: IG nodes, then the threshold, then edges
        t0 = time.time()
        model = load_model(job["model_dir"], dtype=torch.float32)  # a local folder
        clean, patch = tokens(model, job["clean"]), tokens(model, job["patch"])
        assert clean.shape == patch.shape, (clean.shape, patch.shape)
        clean_answers = torch.tensor(job["clean_answer_ids"])
        patch_answers = torch.tensor(job["patch_answer_ids"])
        spec = our_sites(model, job, names)
        sites = as_sites(spec)
        state = node_state(model, sites, clean, patch, method="ig", steps=args.steps,
                           ig_rule="left", clean_answers=clean_answers,
                           patch_answers=patch_answers)
        timings["ours: IG nodes"] = time.time() - t0
        effects = state.effects
        largest = max(float(torch.cat([effects.features[n].flatten(),
                                       effects.errors[n].flatten()]).abs().max()) for n in names)
        threshold = args.threshold_fraction * largest

        pairs = edge_pairs(sites)  # sites already in execution order
        layout = []
        for i in range(LAYERS):
            prev = "embed" if i == 0 else f"resid_{i - 1}"
            a, m, r = f"attn_{i}", f"mlp_{i}", f"resid_{i}"
            layout += [(prev, a, []), (prev, m, [a]), (prev, r, [a, m]), (a, m, []), (a, r, [m]),
                       (m, r, [])]
        assert pairs == layout, pairs
        t0 = time.time()
        edges = edge_effects(model, state=state, node_threshold=threshold, pairs=pairs)
        timings["ours: edges"] = time.time() - t0

        # ---- theirs: get_circuit with edges, the same threshold
        fc, timings["theirs: get_circuit (IG nodes + edges, incl. startup)"] = theirs(
            {**job, "nodes_only": False, "node_threshold": threshold}, folder, "ig_edges")

        print(f"tiny GPT-2: {LAYERS} layers, width {D_MODEL}, {HEADS} heads; AutoEncoders "
              f"d_sae={args.dict_size} at {', '.join(names)}; {len(job['clean'])} prompt pairs "
              f"of {clean.shape[1]} tokens; float32, CPU")
        print(f"IG steps {args.steps}, alpha = i/steps (ours ig_rule='left'); aggregation 'sum'; "
              f"node_threshold {threshold:.4g} = {args.threshold_fraction} x largest per-example "
              f"|node effect| ({largest:.4g})")

        # total effect
        y_ours, y_theirs = effects.total, fc["nodes/y"]
        print(f"\ntotal effect y per example: ours {[round(v, 6) for v in y_ours.tolist()]}, "
              f"theirs {[round(v, 6) for v in y_theirs.tolist()]}, max|diff| "
              f"{float((y_ours - y_theirs).abs().max()):.2e}")

        ours_raw = {n: (effects.features[n], effects.errors[n]) for n in names}
        summed = effects.summed().mean()
        ours_sum = {n: (summed.features[n], summed.errors[n]) for n in names}
        worst = {"IG nodes": node_table(
            "node effects, integrated gradients: max|ours - theirs| / max|effect| at the site "
            "(ex: per example and position, [b, s, F] and error [b, s]; sum: aggregated, [F] and "
            "error)", names, ours_raw, fc, ours_sum, fc)}

        # resid_{L-1} -> y
        last = f"resid_{LAYERS - 1}"
        to_y = fc[f"edges/{last}/y"]
        ours_y = torch.cat([summed.features[last], summed.errors[last].reshape(1)])
        print(f"  edges[{last}][y] vs our aggregated {last} node effects: "
              f"{rel(ours_y, to_y, float(to_y.abs().max())):.1e}")

        print("\nedge effects, aggregated [F_down + 1, F_up + 1]: max|ours - theirs| over the "
              "upstream feature columns / max|edge| there; chosen: downstream (example, "
              "position, node) rows above the threshold (ours); rows: aggregated downstream "
              "nodes with a nonzero feature-column edge, ours / theirs, and whether the sets are "
              "equal; err col: max|edge| out of the upstream error node (theirs always 0)")
        print(f"  {'upstream -> downstream':22s} {'max|edge|':>10s} {'rel diff':>9s} "
              f"{'chosen':>6s} {'rows':>9s} {'same':>5s} {'err col ours':>12s} {'theirs':>7s}")
        F = args.dict_size
        worst_edges = 0.0
        for upstream, downstream, _ in pairs:
            o = edges[(upstream, downstream)].summed().to_dense()
            t = fc[f"edges/{upstream}/{downstream}"]
            scale = float(t[:, :F].abs().max())
            r = rel(o[:, :F], t[:, :F], scale)
            worst_edges = max(worst_edges, r)
            # a chosen node inactive in the clean run (d = 0: its effect comes from the patch)
            # has g_d * d = 0 and no edges, on both sides: compare the rows that hold an edge
            chosen = len(edges[(upstream, downstream)].rows)
            o_rows = set((o[:, :F] != 0).any(1).nonzero().flatten().tolist())
            t_rows = set((t[:, :F] != 0).any(1).nonzero().flatten().tolist())
            print(f"  {upstream + ' -> ' + downstream:22s} {scale:10.4g} {r:9.1e} {chosen:6d} "
                  f"{len(o_rows):4d}/{len(t_rows):<4d} {str(o_rows == t_rows):>5s} "
                  f"{float(o[:, F].abs().max()):12.4g} {float(t[:, F].abs().max()):7.2g}")
        worst["IG edges (feature columns)"] = worst_edges

        # ---- attribution patching
        if not args.no_attrib:
            at_names = [f"{kind}_{i}" for i in range(LAYERS) for kind in ("attn", "resid")]
            t0 = time.time()
            at_state = node_state(model, as_sites(our_sites(model, job, at_names)), clean, patch,
                                  method="attribution", clean_answers=clean_answers,
                                  patch_answers=patch_answers)
            timings["ours: attribution, attn+resid sites"] = time.time() - t0
            fa, timings["theirs: attrib, attn+resid sites (incl. startup)"] = theirs_attrib_at(
                job, at_names, folder)
            e = at_state.effects
            worst["attrib nodes, attn+resid sites"] = node_table(
                "node effects, attribution patching, sites attn_i and resid_i only (per example "
                "and position)", at_names, {n: (e.features[n], e.errors[n]) for n in at_names},
                fa, None, None)
            print(f"  total effect y: max|diff| {float((e.total - fa['raw/y']).abs().max()):.2e}")

            t0 = time.time()
            all_state = node_state(model, sites, clean, patch, method="attribution",
                                   clean_answers=clean_answers, patch_answers=patch_answers)
            timings["ours: attribution, all sites"] = time.time() - t0
            fb, timings["theirs: attrib, all sites (incl. startup)"] = theirs(
                {**job, "method": "attrib", "nodes_only": True, "node_threshold": 0.0}, folder,
                "attrib_nodes")
            e = all_state.effects
            s = e.summed().mean()
            worst["attrib nodes, all sites (mlp/resid of the last layer)"] = node_table(
                "node effects, attribution patching, every site (their attrib is exact only where "
                "no decomposed MLP / embedding lies downstream)", names,
                {n: (e.features[n], e.errors[n]) for n in names}, fb,
                {n: (s.features[n], s.errors[n]) for n in names}, fb,
                expected={f"mlp_{LAYERS - 1}", f"resid_{LAYERS - 1}"})

        print("\nworst relative differences:")
        for key, value in worst.items():
            print(f"  {key:55s} {value:.1e}")
        print("\nrun time:")
        for key, value in timings.items():
            print(f"  {key:55s} {value:6.1f} s")
        print(f"  {'total':55s} {time.time() - start:6.1f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Run inside the feature-circuits peer venv (`bash bench/setup_peers.sh feature-circuits`):
Marks et al.'s `get_circuit` (saprmarks/feature-circuits, Sparse Feature Circuits) on a local model
and upstream-format dictionaries, the reference for dictionary_learning.circuits. Imports only the
peer: its source at <venv>/src/feature-circuits, upstream dictionary_learning 0.1.0, nnsight 0.3.7.

    <venv>/bin/python tests/peer_feature_circuits.py JOB.json

JOB.json:
    model_dir       a local Hugging Face model folder (model + tokenizer), loaded as
                    nnsight.LanguageModel(model_dir, dispatch=True, torch_dtype=float32) on the
                    CPU (a tokenizer saved by transformers 5 is read as a PreTrainedTokenizerFast)
    family          "gpt2" | "llama" | "gpt_neox": module paths from PATHS ("paths" in the job
                    overrides any of them); embed is the token embedding's output, attn_{i} the
                    attention module's output (element 0 of its tuple), mlp_{i} the MLP's output,
                    resid_{i} the block's output (element 0)
    dictionaries    {"embed": folder, "attn_0": folder, "mlp_0": folder, "resid_0": folder, ...}:
                    upstream-format folders (ae.pt + config.json; dict_class AutoEncoder or
                    JumpReluAutoEncoder) for every layer's attn/mlp/resid; "embed" is optional
                    (without it: no embed node, no edges out of it). All must share one dict_size
                    (upstream's jvp sizes every edge tensor by the downstream dictionary's).
                    AutoEncoder.from_pretrained renormalises decoder columns to unit norm.
    clean, patch    lists of prompts, all of one token length (no padding)
    clean_answer_ids, patch_answer_ids   one token id per prompt
    aggregation     "sum" | "none"
    nodes_only      bool
    node_threshold  float: edges are computed only into downstream (example, position, feature)
                    nodes whose per-example |effect| exceeds it
    method, steps   optional, "ig" and 10 by default (what get_circuit itself hard-codes);
                    "attrib" or other steps wrap circuit.patching_effect to pass them
    parallel_attn   optional, False by default (True for gpt_neox: no attn_i -> mlp_i edge)
    metric_site     optional, "unembed" (default) or "logits" (see Metric)
    source          optional, feature-circuits' source folder (default <venv>/src/feature-circuits)
    out             the safetensors file to write; names and shapes also go to out with suffix
                    .json

Metric: the paper's (circuit.py's __main__ for paired data), per example
    logits[:, -1, patch_answer] - logits[:, -1, clean_answer],
read from the unembedding module's output (PATHS "unembed"). `"metric_site": "logits"` reads
model.output.logits as circuit.py does, which nnsight 0.3.7 does not narrow to an invoke's rows:
_pe_ig's interpolation steps then all score the alpha = 0 invoke, and IG degenerates to the
gradient at the clean run. The two agree in one-invoke traces (attrib, jvp).

Known behaviour of this commit under nnsight 0.3.7 (checked against plain PyTorch, tiny GPT-2):
    - IG node effects (default metric site) and jvp's edge weights out of features are exact;
      jvp's column for the upstream error node is always 0 (jvp zeroes x_res.grad before it
      reads it), so no edge leaves an error node.
    - method "attrib": a submodule's gradient is exact only when no decomposed non-tuple module
      (MLP, embedding) lies downstream of it; get_circuit itself uses "ig".

Tensors written (dense float32):
    nodes/<name>/act, nodes/<name>/resc   get_circuit's node effects (SparseAct act, contracted
                                          error): sum -> [F], [1]; none -> [s, F], [s, 1]
    nodes/y                               total effect m(patch) - m(clean): [b] under "sum"
                                          (upstream leaves it per example), [] otherwise
    edges/<upstream>/<downstream>         get_circuit's edges[upstream][downstream], dense,
                                          indexed [downstream, upstream]: sum -> [F+1, F+1];
                                          none -> [s, F+1, s, F+1] (index F: the error node);
                                          edges/resid_{L-1}/y: [F+1] (sum) or [s, F+1] (none)
    raw/<name>/act, raw/<name>/resc       patching_effect's per-example effects: [b, s, F],
                                          [b, s, 1]
    raw/y                                 patching_effect's total effect: [b]
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

SOURCE = Path(sys.prefix) / "src" / "feature-circuits"

# family -> module paths: layers (the block ModuleList), embed, attn and mlp (relative to a block),
# unembed (whose output is the logits)
PATHS = {
    "gpt2": {"layers": "transformer.h", "embed": "transformer.wte", "attn": "attn", "mlp": "mlp",
             "unembed": "lm_head"},
    "llama": {"layers": "model.layers", "embed": "model.embed_tokens", "attn": "self_attn",
              "mlp": "mlp", "unembed": "lm_head"},
    "gpt_neox": {"layers": "gpt_neox.layers", "embed": "gpt_neox.embed_in", "attn": "attention",
                 "mlp": "mlp", "unembed": "embed_out"},
}


def envoy(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def tokenizer(model_dir: str):
    """The folder's tokenizer, left-padded as nnsight 0.3.7 loads it; a fast tokenizer saved by
    transformers 5 (tokenizer_class "TokenizersBackend", unknown to the transformers < 4.48 here) is
    read as the PreTrainedTokenizerFast that its tokenizer.json describes."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    except ValueError:
        if not (Path(model_dir) / "tokenizer.json").exists():
            raise
        return PreTrainedTokenizerFast.from_pretrained(model_dir, padding_side="left")


def load_dictionary(folder: str):
    from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder

    config = json.loads((Path(folder) / "config.json").read_text())
    dict_class = config.get("trainer", config).get("dict_class", "AutoEncoder")
    ae_path = str(Path(folder) / "ae.pt")
    if dict_class == "AutoEncoder":
        return AutoEncoder.from_pretrained(ae_path, dtype=torch.float32, device="cpu")
    if dict_class == "JumpReluAutoEncoder":
        return JumpReluAutoEncoder.from_pretrained(ae_path, dtype=torch.float32, device="cpu")
    raise ValueError(f"{folder}: dict_class {dict_class!r} is not one get_circuit was written for "
                     "(AutoEncoder, JumpReluAutoEncoder)")


def submodules(model, job: dict, n_dicts: dict):
    from loading_utils import Submodule

    paths = {**PATHS[job["family"]], **job.get("paths", {})}
    blocks = envoy(model, paths["layers"])
    n_layers = len(blocks)
    embed = (Submodule("embed", envoy(model, paths["embed"])) if "embed" in n_dicts else None)
    attns = [Submodule(f"attn_{i}", envoy(blocks[i], paths["attn"]), is_tuple=True)
             for i in range(n_layers)]
    mlps = [Submodule(f"mlp_{i}", envoy(blocks[i], paths["mlp"])) for i in range(n_layers)]
    resids = [Submodule(f"resid_{i}", blocks[i], is_tuple=True) for i in range(n_layers)]
    return embed, attns, mlps, resids


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, str(Path(job.get("source", SOURCE))))
    import circuit
    import nnsight
    from circuit import get_circuit
    from nnsight import LanguageModel
    from safetensors.torch import save_file

    import dictionary_learning

    # the peer, not this checkout's package
    peer_file = Path(dictionary_learning.__file__).resolve()
    assert peer_file.is_relative_to(Path(sys.prefix).resolve()), peer_file
    torch.manual_seed(0)

    model = LanguageModel(job["model_dir"], dispatch=True, torch_dtype=torch.float32,
                          tokenizer=tokenizer(job["model_dir"]))
    model.eval()
    lengths = {len(model.tokenizer(p).input_ids) for p in job["clean"] + job["patch"]}
    if len(lengths) != 1:
        raise ValueError(f"clean and patch prompts must all have one token length, got {lengths}")

    dictionaries_by_name = {name: load_dictionary(folder)
                            for name, folder in job["dictionaries"].items()}
    embed, attns, mlps, resids = submodules(model, job, dictionaries_by_name)
    all_submods = ([embed] if embed is not None else []) + attns + mlps + resids
    missing = [s.name for s in all_submods if s.name not in dictionaries_by_name]
    if missing:
        raise ValueError(f"no dictionary for {missing}")
    sizes = {d.dict_size for d in dictionaries_by_name.values()}
    if len(sizes) != 1:
        raise ValueError(f"upstream's jvp needs one dict_size for all dictionaries, got {sizes}")
    dictionaries = {s: dictionaries_by_name[s.name] for s in all_submods}

    clean_ids = torch.tensor(job["clean_answer_ids"], dtype=torch.long)
    patch_ids = torch.tensor(job["patch_answer_ids"], dtype=torch.long)
    metric_site = job.get("metric_site", "unembed")
    unembed = envoy(model, {**PATHS[job["family"]], **job.get("paths", {})}["unembed"])

    def metric_fn(model):  # circuit.py's __main__ (paired data): logit(patch) - logit(clean)
        # "logits": upstream's model.output.logits, which nnsight 0.3.7 does not narrow to an
        # invoke's rows, so in _pe_ig's one-invoke-per-step trace every step's metric reads the
        # first invoke (alpha = 0) and IG collapses to the gradient at the clean run; "unembed":
        # the unembedding module's output, narrowed per invoke (the same in one-invoke traces)
        if metric_site == "logits":
            logits = model.output.logits[:, -1, :]
        else:
            logits = unembed.output[:, -1, :]
        return (torch.gather(logits, dim=-1, index=patch_ids.view(-1, 1)).squeeze(-1)
                - torch.gather(logits, dim=-1, index=clean_ids.view(-1, 1)).squeeze(-1))

    # get_circuit calls patching_effect(..., method="ig") with its default steps=10; other choices
    # (and a copy of the per-example effects) through a wrapper around the name circuit.py imported
    method, steps = job.get("method", "ig"), int(job.get("steps", 10))
    original = circuit.patching_effect
    captured = {}

    @functools.wraps(original)
    def patching_effect(*args, **kwargs):
        kwargs["method"], kwargs["steps"] = method, steps
        result = original(*args, **kwargs)
        captured["raw"] = result
        return result

    circuit.patching_effect = patching_effect
    nodes, edges = get_circuit(
        job["clean"], job["patch"], model, embed, attns, mlps, resids, dictionaries, metric_fn,
        aggregation=job["aggregation"], nodes_only=bool(job["nodes_only"]),
        parallel_attn=bool(job.get("parallel_attn", job["family"] == "gpt_neox")),
        node_threshold=float(job["node_threshold"]),
    )

    def dense(x: torch.Tensor) -> torch.Tensor:
        x = x.to_dense() if x.is_sparse else x
        return x.detach().to(torch.float32).clone().contiguous()  # nodes/y is raw/y under "sum"

    tensors = {}
    for name, value in nodes.items():
        if name == "y":
            tensors["nodes/y"] = dense(value)
        else:
            tensors[f"nodes/{name}/act"] = dense(value.act)
            tensors[f"nodes/{name}/resc"] = dense(value.resc)
    for upstream, downstreams in (edges or {}).items():
        for downstream, weights in downstreams.items():
            tensors[f"edges/{upstream}/{downstream}"] = dense(weights)
    raw = captured["raw"]
    for submodule, effect in raw.effects.items():
        tensors[f"raw/{submodule.name}/act"] = dense(effect.act)
        tensors[f"raw/{submodule.name}/resc"] = dense(effect.resc)
    tensors["raw/y"] = dense(raw.total_effect)

    out = Path(job["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    commit_file = SOURCE.parent / "COMMIT"
    summary = {
        "ok": True,
        "feature_circuits": commit_file.read_text().strip() if commit_file.exists() else None,
        "nnsight": nnsight.__version__, "dictionary_learning": dictionary_learning.__version__,
        "torch": torch.__version__,
        "metric": "logits[:, -1, patch_answer] - logits[:, -1, clean_answer]",
        "metric_site": metric_site,
        "method": method, "steps": steps, "aggregation": job["aggregation"],
        "nodes_only": bool(job["nodes_only"]),
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "shapes"}
                     | {"tensors": len(tensors), "out": str(out)}))


if __name__ == "__main__":
    main()

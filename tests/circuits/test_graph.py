"""The circuit's graph: the nodes and edges the thresholds keep, drawn to PNG and SVG, and
written in circuit-tracer's graph JSON, which circuit-tracer's own pydantic schema accepts."""

import json
import subprocess

import pytest

from dictionary_learning.circuits.edges import edge_effects
from dictionary_learning.circuits.faithfulness import circuit_nodes
from dictionary_learning.circuits.graph import build_graph, draw_graph, write_circuit_tracer_graph
from dictionary_learning.circuits.nodes import node_state

from ..helpers import missing_peer
from .test_edges import layer_sites
from .test_nodes import METRIC, prompts


@pytest.fixture(scope="module")
def graph(tiny_llama):
    sites = layer_sites(tiny_llama)
    clean, patch = prompts(seed=9)
    state = node_state(tiny_llama, sites, clean, patch, METRIC)
    edges = edge_effects(tiny_llama, state=state, node_threshold=1e-3)
    made = build_graph(state, edges, node_threshold=1e-3, edge_threshold=1e-4,
                       labels={("resid_0", 0): "feature zero"},
                       dashboards={"resid_0": "../dash/index.html"})
    return state, edges, made


def test_nodes_and_links_are_those_the_thresholds_keep(graph):
    state, edges, made = graph
    kept = circuit_nodes(state, 1e-3)
    assert len(made.nodes) == sum(int(k.sum()) for k in kept.values()) > 0
    ids = {node["id"] for node in made.nodes}
    assert all(link["source"] in ids and link["target"] in ids for link in made.links)
    assert all(abs(link["weight"]) > 1e-4 for link in made.links)
    expected = 0
    for (upstream, downstream), found in edges.items():
        matrix = found.summed().to_dense()
        for d in kept[downstream].nonzero().flatten().tolist():
            for u in kept[upstream].nonzero().flatten().tolist():
                expected += abs(float(matrix[d, u])) > 1e-4
    assert len(made.links) == expected > 0
    errors = [node for node in made.nodes if node["feature"] == -1]
    assert all(node["label"].endswith("error") for node in errors)


def test_drawn_and_written(graph, tmp_path):
    _, _, made = graph
    for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml")):
        path = draw_graph(made, tmp_path / f"circuit{suffix}")
        assert path.read_bytes().startswith(magic)
    # each resid_0 feature node links to its dashboard page
    linked = [n for n in made.nodes if n["site"] == "resid_0" and n["feature"] >= 0]
    svg = (tmp_path / "circuit.svg").read_text()
    assert linked and all(f'../dash/index.html#feature-{n["feature"]}"' in svg for n in linked)
    assert all(n["url"] is None for n in made.nodes if n["site"] != "resid_0")
    path = write_circuit_tracer_graph(made, tmp_path / "circuit.json", ["a", "b", "c", "d", "e",
                                                                        "f"])
    document = json.loads(path.read_text())
    assert document["metadata"]["slug"] == "circuit"
    assert len(document["nodes"]) == len(made.nodes) + 1  # and the metric's logit node


@pytest.mark.peers
def test_circuit_tracer_reads_the_graph(graph, tmp_path):
    from bench.peers import peers_dir

    python = peers_dir() / "circuit-tracer" / "bin" / "python"
    if not python.exists():
        missing_peer("circuit-tracer")
    _, _, made = graph
    path = write_circuit_tracer_graph(made, tmp_path / "circuit.json", list("abcdef"))
    check = ("import sys; from circuit_tracer.frontend.graph_models import Model; "
             "m = Model.model_validate_json(open(sys.argv[1]).read()); "
             "print(len(m.nodes), len(m.links))")
    done = subprocess.run([str(python), "-c", check, str(path)], capture_output=True, text=True,
                          cwd="/", check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(len(made.nodes) + 1),
                                   str(len(json.loads(path.read_text())["links"]))]


def test_feature_labels_name_the_top_activating_token(tiny_llama):
    """A feature's label starts with the token where it is largest on the texts, found here with
    a plain PyTorch hook."""
    import torch

    from dictionary_learning.circuits.graph import feature_labels

    sites = layer_sites(tiny_llama)[:1]
    site = sites[0]
    texts = ["the quick brown fox", "jumps over the lazy dog", "pack my box with jugs"]
    labels = feature_labels(tiny_llama, sites, {site.name: [0, 5]}, texts, n_top=2)
    seen = {}
    handle = tiny_llama._module.get_submodule(site.point.path).register_forward_hook(
        lambda module, args, out: seen.setdefault("x", []).append(
            out[0] if isinstance(out, tuple) else out))
    try:
        best = []
        with torch.no_grad():
            for text in texts:
                ids = tiny_llama.tokenizer(text, return_tensors="pt")["input_ids"]
                seen.clear()
                tiny_llama._module(ids)
                codes = site.dictionary.encode(seen["x"][0][0, 1:].double())  # first token dropped
                for feature in (0, 5):
                    value, where = codes[:, feature].max(0)
                    best.append((feature, float(value),
                                 tiny_llama.tokenizer.decode(ids[0, 1 + int(where)])))
    finally:
        handle.remove()
    for feature in (0, 5):
        value, token = max((v, t) for f, v, t in best if f == feature)
        if value > 0:
            assert labels[(site.name, feature)].startswith(f"resid_0 #{feature}: «{token}»")

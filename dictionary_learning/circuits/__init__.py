"""Sparse feature circuits (Marks et al. 2024) on today's nnsight: node effects of every feature and
every dictionary's error, over SAEs and transcoders spliced into the model, by attribution patching
and integrated gradients; edge effects between the nodes of consecutive sites; circuits by node
threshold with their faithfulness and completeness by real mean ablations; the circuit as a
layered graph (matplotlib, circuit-tracer's graph JSON); the subject-verb agreement prompt pairs
the paper uses; over an SCAE suite, the exact edges of its connections beside the attribution
edges."""

from .edges import EdgeEffects, edge_effects, edge_pairs
from .faithfulness import (
    Faithfulness,
    ablated_metric,
    circuit_nodes,
    faithfulness_curve,
    mean_values,
)
from .graph import (
    CircuitGraph,
    build_graph,
    draw_curve,
    draw_graph,
    feature_labels,
    write_circuit_tracer_graph,
)
from .nodes import (
    NodeEffects,
    NodeState,
    as_encoding,
    logit_difference,
    node_effects,
    node_state,
    run_metric,
)
from .prompts import (
    AGREEMENT_CASES,
    PromptPair,
    agreement_pairs,
    encode_pairs,
    load_prompt_pairs,
    save_prompt_pairs,
    single_token_pairs,
)
from .scae import (
    EdgeAgreement,
    connection_edges,
    edge_agreement,
    suite_edges,
    suite_node_state,
    suite_pairs,
    suite_sites,
)
from .sites import Site, SiteValues, as_sites, splice

__all__ = ["AGREEMENT_CASES", "CircuitGraph", "EdgeAgreement", "EdgeEffects", "Faithfulness",
           "NodeEffects", "NodeState", "PromptPair", "Site", "SiteValues", "ablated_metric",
           "agreement_pairs", "as_encoding", "as_sites", "build_graph", "circuit_nodes",
           "connection_edges", "draw_curve", "draw_graph", "edge_agreement", "edge_effects",
           "edge_pairs", "encode_pairs", "faithfulness_curve", "feature_labels",
           "load_prompt_pairs", "logit_difference", "mean_values", "node_effects", "node_state",
           "run_metric", "save_prompt_pairs", "single_token_pairs", "splice", "suite_edges",
           "suite_node_state", "suite_pairs", "suite_sites", "write_circuit_tracer_graph"]

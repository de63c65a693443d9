#!/usr/bin/env bash
# Build one virtual environment per peer package, for the training-throughput benchmarks (bench/peer_step.py runs
# inside them; bench/peers.py finds them) and for the `peers` tests (tests/compat/test_upstream_files.py, upstream's
# own trainSAE and loaders; tests/formats/test_formats_peers.py, the other libraries' loaders), and for
# tests/peer_feature_circuits.py (Marks et al.'s get_circuit, the reference for dictionary_learning.circuits).
#
#   bash bench/setup_peers.sh                        every peer
#   bash bench/setup_peers.sh dictionary-learning    one of them
#
#   ${PEERS_DIR:-$HOME/.cache/dictionary_learning/peers}/dictionary-learning   Sam Marks' dictionary-learning 0.1.0
#   ${PEERS_DIR:-$HOME/.cache/dictionary_learning/peers}/sae-lens              sae-lens (6.54.12 unless SAE_LENS_VERSION)
#   ${PEERS_DIR:-$HOME/.cache/dictionary_learning/peers}/eai-sparsify          EleutherAI's sparsify (1.3.3 unless
#                                                                              SPARSIFY_VERSION)
#   ${PEERS_DIR:-$HOME/.cache/dictionary_learning/peers}/circuit-tracer        circuit-tracer (0.5.0 unless
#                                                                              CIRCUIT_TRACER_VERSION), for
#                                                                              demos/circuit_tracer_peer.py
#   ${PEERS_DIR:-$HOME/.cache/dictionary_learning/peers}/feature-circuits      saprmarks/feature-circuits at
#                                                                              FEATURE_CIRCUITS_COMMIT (not a
#                                                                              package: its source is exported to
#                                                                              src/feature-circuits inside the venv,
#                                                                              which the runner puts on sys.path)
#                                                                              with dictionary-learning 0.1.0 and
#                                                                              nnsight 0.3.7, for
#                                                                              tests/peer_feature_circuits.py
#
# Each venv gets torch==2.13.0 first (this machine's local CPU wheel) and every later pip call is constrained to
# it, so no peer can swap in a multi-GB CUDA torch. dictionary-learning 0.1.0 pins nnsight<0.4 whose deps pull
# torch 2.14.1 + CUDA: it and nnsight 0.3.7 go in with --no-deps, followed by the few packages that
# `from dictionary_learning.trainers.top_k import TopKTrainer` actually imports. feature-circuits is a repository, not
# a package: its source comes from FEATURE_CIRCUITS_SRC when set (a git clone, a bare git dir, or a plain copy of
# the files at that commit), else from a `git clone` of GitHub (needs the network). Idempotent: a venv that already
# imports its peer on torch 2.13.0 is left alone (FORCE=1 rebuilds).
set -euo pipefail

PEERS_DIR="${PEERS_DIR:-$HOME/.cache/dictionary_learning/peers}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
DICTIONARY_LEARNING_VERSION="0.1.0"
NNSIGHT_VERSION="0.3.7"
SAE_LENS_VERSION="${SAE_LENS_VERSION:-6.54.12}"
SPARSIFY_VERSION="${SPARSIFY_VERSION:-1.3.3}"
CIRCUIT_TRACER_VERSION="${CIRCUIT_TRACER_VERSION:-0.5.0}"
# main of 2025-03-01 ("fixing hacking"): requirements.txt pins nnsight<0.4 and `dictionary_learning` (the package)
FEATURE_CIRCUITS_COMMIT="1d87366c758c484bd5c419af1b92f6ec0678046e"
FEATURE_CIRCUITS_URL="https://github.com/saprmarks/feature-circuits"
# its code only: data/ holds large JSON files (absent from some mirrors) that get_circuit never reads
FEATURE_CIRCUITS_FILES=(LICENSE README.md requirements.txt ablation.py activation_utils.py attribution.py circuit.py
                        circuit_plotting.py coo_utils.py data_loading_utils.py dictionary_loading_utils.py loading_utils.py)
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

mkdir -p "$PEERS_DIR"
CONSTRAINTS="$PEERS_DIR/torch-constraint.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

# What each peer's venv must import for the benchmark to run.
check_code() {
    case "$1" in
        dictionary-learning) echo "from dictionary_learning.trainers.top_k import TopKTrainer, AutoEncoderTopK
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary";;
        sae-lens) echo "from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig";;
        eai-sparsify) echo "from sparsify import SparseCoder, SparseCoderConfig
from sparsify.config import TrainConfig";;
        circuit-tracer) echo "from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import compute_graph_scores
from circuit_tracer.replacement_model.replacement_model_nnsight import NNSightReplacementModel";;
        feature-circuits) echo "import sys
sys.path.insert(0, '$PEERS_DIR/feature-circuits/src/feature-circuits')
from circuit import get_circuit
from attribution import patching_effect, jvp
from activation_utils import SparseAct
from loading_utils import Submodule
import nnsight, dictionary_learning
assert nnsight.__version__ == '$NNSIGHT_VERSION', nnsight.__version__
assert dictionary_learning.__version__ == '$DICTIONARY_LEARNING_VERSION'";;
    esac
}

venv_works() {  # name -> 0 if the venv imports its peer on the pinned torch and holds no CUDA wheels
    local name="$1" py="$PEERS_DIR/$1/bin/python"
    [ -x "$py" ] || return 1
    # from /, so that `python -` (cwd first on sys.path) cannot import this checkout's dictionary_learning instead
    (cd / && "$py" - <<EOF >/dev/null 2>&1) || return 1
import importlib.metadata as metadata, torch
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", torch.__version__
assert not [d for d in metadata.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-")]
$(check_code "$name")
EOF
}

pip_in() {  # name, pip install args...
    local name="$1"; shift
    "$PEERS_DIR/$name/bin/python" -m pip install --quiet "$@"
}

install_dictionary_learning() {
    local name=dictionary-learning
    pip_in "$name" "torch==$TORCH_VERSION"
    pip_in "$name" --no-deps "dictionary-learning==$DICTIONARY_LEARNING_VERSION" "nnsight==$NNSIGHT_VERSION"
    # Found by importing dictionary_learning.trainers.top_k, .training and .utils and fixing ImportErrors one by
    # one: the package imports nnsight (for its buffer) at top level, and nnsight 0.3.7 imports transformers
    # (< 4.48, of its era, which needs huggingface-hub < 1), accelerate, pydantic, yaml, socketio and PIL; training
    # imports wandb, utils imports datasets (< 4, of its era) and zstandard. Declared-but-unneeded deps (umap-learn,
    # circuitsvis, plotly, pandas, llvmlite; nnsight's diffusers, torchvision, sentencepiece, protobuf) are left
    # out.
    echo "[setup_peers] (pip's 'requires ..., which is not installed' lines below are those left-out deps: expected)"
    pip_in "$name" -c "$CONSTRAINTS" einops tqdm pyyaml pydantic accelerate "transformers<4.48" \
        "huggingface-hub<1.0" "python-socketio[client]" pillow wandb "datasets<4" zstandard
}

install_sae_lens() {
    local name=sae-lens
    pip_in "$name" "torch==$TORCH_VERSION"
    # Its declared deps resolve against torch==2.13.0 (transformer-lens accepts it), so a plain install under
    # the constraint keeps the CPU torch.
    pip_in "$name" -c "$CONSTRAINTS" "sae-lens==$SAE_LENS_VERSION"
}

install_sparsify() {
    local name=eai-sparsify
    pip_in "$name" "torch==$TORCH_VERSION"
    # Its declared deps (accelerate, datasets, transformers, schedulefree, ...) accept torch==2.13.0; no Triton on
    # the CPU, where it decodes with embedding_bag.
    pip_in "$name" -c "$CONSTRAINTS" "eai-sparsify==$SPARSIFY_VERSION"
}

install_circuit_tracer() {
    local name=circuit-tracer
    pip_in "$name" "torch==$TORCH_VERSION"
    # Its declared deps (transformers<=4.57.3, huggingface-hub<1, nnsight>=0.6, transformer-lens, ...) accept
    # torch==2.13.0, so a plain install under the constraint keeps the CPU torch. nnsight must stay below 0.8:
    # 0.8 moved nnsight.intervention.tracing.tracer (circuit-tracer 0.5.0 imports Barrier from it), so its
    # nnsight backend fails to import against the nnsight>=0.6 that it declares.
    pip_in "$name" -c "$CONSTRAINTS" "circuit-tracer==$CIRCUIT_TRACER_VERSION" "nnsight>=0.6,<0.8"
}

export_feature_circuits() {  # destination folder <- feature-circuits' FEATURE_CIRCUITS_FILES at FEATURE_CIRCUITS_COMMIT
    local dest="$1" src="${FEATURE_CIRCUITS_SRC:-}" tmp file
    mkdir -p "$dest"
    if [ -n "$src" ] && git --git-dir="$src" rev-parse --verify -q "$FEATURE_CIRCUITS_COMMIT^{commit}" >/dev/null 2>&1; then
        git --git-dir="$src" archive "$FEATURE_CIRCUITS_COMMIT" -- "${FEATURE_CIRCUITS_FILES[@]}" \
            | tar -x -C "$dest"                                                                # a bare git dir
    elif [ -n "$src" ] && git -C "$src" rev-parse --verify -q "$FEATURE_CIRCUITS_COMMIT^{commit}" >/dev/null 2>&1; then
        git -C "$src" archive "$FEATURE_CIRCUITS_COMMIT" -- "${FEATURE_CIRCUITS_FILES[@]}" | tar -x -C "$dest"  # a clone
    elif [ -n "$src" ] && [ -f "$src/circuit.py" ] && [ -f "$src/attribution.py" ]; then
        echo "[setup_peers] feature-circuits: copying $src as is (not a git repository holding" \
             "$FEATURE_CIRCUITS_COMMIT, so its commit is unchecked)"
        for file in "${FEATURE_CIRCUITS_FILES[@]}"; do cp "$src/$file" "$dest/"; done
    elif [ -n "$src" ]; then
        echo "[setup_peers] feature-circuits: FEATURE_CIRCUITS_SRC=$src holds neither commit" \
             "$FEATURE_CIRCUITS_COMMIT nor circuit.py + attribution.py" >&2
        return 1
    else
        tmp=$(mktemp -d)
        if git clone --quiet "$FEATURE_CIRCUITS_URL" "$tmp/repo" 2>/dev/null \
           && git -C "$tmp/repo" archive "$FEATURE_CIRCUITS_COMMIT" -- "${FEATURE_CIRCUITS_FILES[@]}" \
               | tar -x -C "$dest"; then
            rm -rf "$tmp"
        else
            rm -rf "$tmp"
            echo "[setup_peers] feature-circuits: could not clone $FEATURE_CIRCUITS_URL at $FEATURE_CIRCUITS_COMMIT" \
                 "(no network?). Supply its source instead: FEATURE_CIRCUITS_SRC=/path/to/a/clone (or bare git dir," \
                 "or a copy of the files at that commit) bash bench/setup_peers.sh feature-circuits" >&2
            return 1
        fi
    fi
}

install_feature_circuits() {
    local name=feature-circuits
    export_feature_circuits "$PEERS_DIR/$name/src/feature-circuits"
    if [ -n "${FEATURE_CIRCUITS_SRC:-}" ] && [ ! -d "$FEATURE_CIRCUITS_SRC/objects" ] && [ ! -d "$FEATURE_CIRCUITS_SRC/.git" ]; then
        echo "unchecked copy of $FEATURE_CIRCUITS_SRC (expected $FEATURE_CIRCUITS_COMMIT)"
    else
        echo "$FEATURE_CIRCUITS_COMMIT"
    fi > "$PEERS_DIR/$name/src/COMMIT"  # tests/peer_feature_circuits.py reports it
    pip_in "$name" "torch==$TORCH_VERSION"
    # As for dictionary-learning (whose 0.1.0 it imports, on the nnsight<0.4 its requirements.txt pins), minus
    # what only upstream's training and utils import (wandb, datasets, zstandard), plus what circuit.py imports at
    # top level through circuit_plotting (the graphviz Python package; no Graphviz binaries: nothing is rendered).
    # The rest of its requirements.txt (circuitsvis, matplotlib, pandas, plotly, torchtyping) serves notebooks and
    # plots that get_circuit never imports.
    pip_in "$name" --no-deps "dictionary-learning==$DICTIONARY_LEARNING_VERSION" "nnsight==$NNSIGHT_VERSION"
    echo "[setup_peers] (pip's 'requires ..., which is not installed' lines below are those left-out deps: expected)"
    pip_in "$name" -c "$CONSTRAINTS" einops tqdm pyyaml pydantic accelerate "transformers<4.48" \
        "huggingface-hub<1.0" "python-socketio[client]" pillow graphviz safetensors
}

status=0
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(dictionary-learning sae-lens eai-sparsify circuit-tracer feature-circuits)
for name in "${names[@]}"; do
    if [ "${FORCE:-0}" != 1 ] && venv_works "$name"; then
        echo "[setup_peers] $name: $PEERS_DIR/$name already works, skipping"
        continue
    fi
    echo "[setup_peers] $name: building $PEERS_DIR/$name"
    rm -rf "${PEERS_DIR:?}/$name"
    "$PYTHON" -m venv "$PEERS_DIR/$name"
    case "$name" in
        dictionary-learning) install_dictionary_learning;;
        sae-lens) install_sae_lens;;
        eai-sparsify) install_sparsify;;
        circuit-tracer) install_circuit_tracer;;
        feature-circuits) install_feature_circuits;;
        *) echo "[setup_peers] unknown peer $name (dictionary-learning, sae-lens, eai-sparsify, circuit-tracer," \
                "feature-circuits)" >&2
           exit 2;;
    esac
    if venv_works "$name"; then
        if [ "$name" = feature-circuits ]; then
            version="$FEATURE_CIRCUITS_COMMIT"
        else
            version=$("$PEERS_DIR/$name/bin/python" -c "import importlib.metadata as m; print(m.version('$name'))")
        fi
        echo "[setup_peers] $name $version ready (torch $TORCH_VERSION)"
    else
        echo "[setup_peers] $name: venv built but its import check fails" >&2
        status=1
    fi
done
exit $status

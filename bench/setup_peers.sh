#!/usr/bin/env bash
# Build one virtual environment per peer package, for the training-throughput benchmarks (bench/peer_step.py runs
# inside them; bench/peers.py finds them) and for the `peers` tests (tests/compat/test_upstream_files.py, upstream's
# own trainSAE and loaders; tests/formats/test_formats_peers.py, the other libraries' loaders).
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
#
# Each venv gets torch==2.13.0 first (this machine's local CPU wheel) and every later pip call is constrained to
# it, so no peer can swap in a multi-GB CUDA torch. dictionary-learning 0.1.0 pins nnsight<0.4 whose deps pull
# torch 2.14.1 + CUDA: it and nnsight 0.3.7 go in with --no-deps, followed by the few packages that
# `from dictionary_learning.trainers.top_k import TopKTrainer` actually imports. Idempotent: a venv that
# already imports its peer on torch 2.13.0 is left alone (FORCE=1 rebuilds).
set -euo pipefail

PEERS_DIR="${PEERS_DIR:-$HOME/.cache/dictionary_learning/peers}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
DICTIONARY_LEARNING_VERSION="0.1.0"
NNSIGHT_VERSION="0.3.7"
SAE_LENS_VERSION="${SAE_LENS_VERSION:-6.54.12}"
SPARSIFY_VERSION="${SPARSIFY_VERSION:-1.3.3}"
CIRCUIT_TRACER_VERSION="${CIRCUIT_TRACER_VERSION:-0.5.0}"
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
    esac
}

venv_works() {  # name -> 0 if the venv imports its peer on the pinned torch and holds no CUDA wheels
    local name="$1" py="$PEERS_DIR/$1/bin/python"
    [ -x "$py" ] || return 1
    "$py" - <<EOF >/dev/null 2>&1 || return 1
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

status=0
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(dictionary-learning sae-lens eai-sparsify circuit-tracer)
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
        *) echo "[setup_peers] unknown peer $name (dictionary-learning, sae-lens, eai-sparsify, circuit-tracer)" >&2
           exit 2;;
    esac
    if venv_works "$name"; then
        version=$("$PEERS_DIR/$name/bin/python" -c "import importlib.metadata as m; print(m.version('$name'))")
        echo "[setup_peers] $name $version ready (torch $TORCH_VERSION)"
    else
        echo "[setup_peers] $name: venv built but its import check fails" >&2
        status=1
    fi
done
exit $status

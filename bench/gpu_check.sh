#!/usr/bin/env bash
# The project's GPU check, from this repository's files alone, on a CUDA machine with no network:
#
#   bash bench/gpu_check.sh [--out DIR] [--dry-run]
#
# 1. environment: python, torch, the GPU, which of the package's requirements import (env.txt);
#    wheels carried in .whl/ (fetched where PyPI is reachable, e.g. with
#    `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl nnsight datasets ...`)
#    go to a target folder on PYTHONPATH without their dependencies, so the machine's torch stays;
#    the package itself runs from this checkout
# 2. the test suite's quick tier with the fixtures' models on the GPU (DL_TEST_DEVICE=cuda;
#    tests.txt)
# 3. bench/bench_scale.py on the GPU against eai-sparsify where this python imports it (its Triton
#    kernels where triton imports; scale.txt, scale.json)
#
# Everything lands in DIR (default gpu_check/), with summary.txt naming each phase ok / failed; each
# phase has a time limit, so the whole check ends within 9 minutes. --dry-run: the same phases on
# the CPU at toy sizes (tests/docs_and_cli/test_gpu_check.py runs it in CI), so the script runs
# unchanged on the first CUDA machine it meets.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=gpu_check
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (expected --out DIR, --dry-run)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"
note() { echo "$1" | tee -a "$OUT/summary.txt"; }

# 1. environment ---------------------------------------------------------------------------------
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    SITE="${TMPDIR:-/tmp}/dictionary_learning_site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
        > "$OUT/install.txt" 2>&1 && note "install: ok (wheels from .whl/)" \
        || note "install: failed (see install.txt)"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name())
OPTIONAL = ("sparsify", "triton")  # the peer and its GPU kernels: the bench runs without them
for name in ("nnsight", "transformers", "datasets", "einops", "wandb", "huggingface_hub",
             "safetensors", "tqdm", "gguf", "accelerate", "matplotlib", "pytest",
             "dictionary_learning", *OPTIONAL):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '')}")
    except Exception as error:  # report every missing piece, not only the first
        state = "absent (optional)" if name in OPTIONAL else "MISSING"
        print(f"  {name} {state} ({type(error).__name__}: {str(error)[:80]})")
EOF
grep -q MISSING "$OUT/env.txt" && note "environment: some packages are missing (env.txt)" \
    || note "environment: ok"

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    TESTS=(tests/dictionary/test_sparse.py)
    SCALE=(--quick --dead 0.1)
else
    DEVICE=cuda
    if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        note "cuda: torch sees no GPU here (use --dry-run on a CPU machine)"
        exit 1
    fi
    TESTS=(-m "not slow and not peers" tests)
    SCALE=(--steps 10 --warmup 3 --rounds 1)
fi

# 2. tests -----------------------------------------------------------------------------------------
DL_TEST_DEVICE=$DEVICE timeout 240 "$PYTHON" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}" \
    > "$OUT/tests.txt" 2>&1
status=$?
note "tests on $DEVICE: $([ $status = 0 ] && echo ok || echo "failed (exit $status)") - $(tail -1 "$OUT/tests.txt")"

# 3. the scale bench ------------------------------------------------------------------------------
PEER=()
if "$PYTHON" -c "import sparsify" >/dev/null 2>&1; then
    PEER=(--peer-python "$(command -v "$PYTHON")")
fi
timeout 270 "$PYTHON" bench/bench_scale.py --device "$DEVICE" "${SCALE[@]}" "${PEER[@]}" \
    --json "$OUT/scale.json" > "$OUT/scale.txt" 2>&1
status=$?
note "scale bench on $DEVICE: $([ $status = 0 ] && echo ok || echo "failed (exit $status)")"
exit 0

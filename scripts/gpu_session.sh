#!/usr/bin/env bash
# The GPU work of issues 4 and 6, in steps that each fit one 10-minute call on a bare GPU
# machine with PyTorch, Triton, pytest and tensorboard already there but no network:
#
#   scripts/gpu_session.sh test        # tests/gpu, then the CPU efficiency tests on the GPU's torch
#   scripts/gpu_session.sh layer       # benchmarks/moe_layer.py: both shapes x routings, every backend,
#                                      # and where native's step time goes (--profile native)
#   scripts/gpu_session.sh e2e [STEPS] [-- OVERRIDES]  # benchmarks/e2e.py on configs/gpu_moe_1b.yaml
#                                      # (default 100 steps), e.g. e2e 100 -- --train.compile=true
#
# Before the first call, on the machine with network: copy ../shared/gpu/wheels/* into
# .gpu_wheels/ (git-ignored) and name .gpu_wheels in the call's carry. Every step first puts
# DeepSpeed (from its wheels, into /tmp/site) and MegaBlocks on the machine. MegaBlocks is built
# from source (scripts/install_megablocks.sh; grouped_gemm compiles for ~3 minutes) unless
# .gpu_wheels/built/ already holds the wheels: a build leaves them in $OUT/built, so copy those
# back into .gpu_wheels/built/ and later calls skip the build. Logs and JSON go to $OUT
# (default runs/gpu_session).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STEP="${1:-}"
OUT="${OUT:-$ROOT/runs/gpu_session}"
WHEELS="$ROOT/.gpu_wheels"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

die() { echo "gpu_session: $*" >&2; exit 1; }

setup() {
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" \
        || die "this step needs a CUDA device"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    python3 -c "import torch, triton; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}')" \
        | tee -a "$OUT/gpu.txt"
    ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1 \
        || die "no DeepSpeed wheel in $WHEELS: copy ../shared/gpu/wheels/* there and carry it"
    # The shared wheels are for CPython 3.12 (pydantic_core is compiled for it).
    python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
        || die "python3 is $(python3 -V 2>&1), the wheels in $WHEELS are for 3.12"
    # Everything goes to /tmp/site: the machine's Python may be externally managed.
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    if ls "$WHEELS"/built/megablocks-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/built/*.whl
    else
        PYTHON=python3 WHEEL_DIR="$OUT/built" MAX_JOBS="${MAX_JOBS:-16}" \
            PIP_INSTALL_ARGS="--target /tmp/site" \
            scripts/install_megablocks.sh "$WHEELS" 2>&1 | tee "$OUT/install_megablocks.log"
    fi
    python3 -c "import torch, megablocks_ops, grouped_gemm, deepspeed; print('deepspeed', deepspeed.__version__)"
}

case "$STEP" in
    test)
        setup
        # every GPU-marked test (tests/gpu and the CUDA cases elsewhere), then the layer's
        # CPU-side tests on this machine's torch
        python3 -m pytest -q -ra -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/test_gpu.log"
        python3 -m pytest -q -ra -p no:cacheprovider tests/unit/test_moe_efficiency.py \
            tests/unit/test_moe_layer.py 2>&1 | tee -a "$OUT/test_gpu.log"
        ;;
    layer)
        setup
        python3 benchmarks/moe_layer.py --profile native --out "$OUT/moe_layer.json" 2>&1 \
            | tee "$OUT/moe_layer.txt"
        ;;
    e2e)
        setup
        # 180 s per backend at most: three backends stay inside one 10-minute call
        python3 benchmarks/e2e.py --steps "${2:-100}" --timeout 180 --out "$OUT/e2e" "${@:3}" 2>&1 \
            | tee "$OUT/e2e.txt"
        ;;
    *)
        sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac

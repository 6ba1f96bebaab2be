#!/usr/bin/env bash
# The GPU work of issues 4 and 6 on a bare GPU machine with PyTorch, Triton, pytest and
# tensorboard already there but no network. Steps run in the order given, after one setup:
#
#   scripts/gpu_session.sh test        # every GPU-marked test, then the layer's CPU-side tests on the GPU's torch
#   scripts/gpu_session.sh layer       # benchmarks/moe_layer.py: both shapes x routings, every backend,
#                                      # and where native's step time goes (--profile native)
#   scripts/gpu_session.sh profile     # benchmarks/profile_step.py: where a training step of
#                                      # configs/gpu_moe_1b.yaml goes: native eager, native with
#                                      # train.compile, megablocks
#   scripts/gpu_session.sh memory      # benchmarks/activation_memory.py: train.recompute none, ffn,
#                                      # full on configs/gpu_moe_1b.yaml: memory held, time, peak
#   scripts/gpu_session.sh e2e [STEPS] [-- OVERRIDES]  # benchmarks/e2e.py on configs/gpu_moe_1b.yaml
#                                      # (default 100 steps), e.g. e2e 100 -- --train.compile=true,
#                                      # or side by side: e2e 200 --backend native --variant eager
#                                      #   --variant compile=--train.compile=true
#   scripts/gpu_session.sh test layer  # both, one setup (e2e, with its arguments, comes last)
#
# Before the first call, on the machine with network: copy ../shared/gpu/wheels/* into
# .gpu_wheels/ (git-ignored) and name .gpu_wheels in the call's carry. Setup puts DeepSpeed
# (from its wheels, into /tmp/site) and MegaBlocks on the machine. MegaBlocks is built from
# source (scripts/install_megablocks.sh; grouped_gemm compiles for ~3 minutes) unless
# .gpu_wheels/built/ already holds the wheels: a build leaves them in $OUT/built, so copy those
# back into .gpu_wheels/built/ and later calls skip the build; a failed build is logged and the
# steps run without MegaBlocks (its tests and rows say why). Each step is cut off at its own
# limit (TEST_TIMEOUT, LAYER_TIMEOUT, PROFILE_TIMEOUT, MEMORY_TIMEOUT, E2E_TIMEOUT seconds; E2E_RUN_TIMEOUT per backend) and at DEADLINE seconds from the
# start (default 570, inside one 10-minute call), so a hang leaves the other steps' output.
# Logs and JSON go to $OUT (default runs/gpu_session): setup.log, the built wheels, each step's
# log and JSON, a failed e2e run's log tail; at most 8 files come back from a device call.
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
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}')"
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
    elif ! PYTHON=python3 WHEEL_DIR="$OUT/built" MAX_JOBS="${MAX_JOBS:-16}" \
            PIP_INSTALL_ARGS="--target /tmp/site" \
            scripts/install_megablocks.sh "$WHEELS" > /tmp/install_megablocks.log 2>&1; then
        cp /tmp/install_megablocks.log "$OUT/"
        tail -n 30 /tmp/install_megablocks.log
        echo "gpu_session: the MegaBlocks build failed (log above); going on without it" >&2
    fi
    python3 -c "import torch, deepspeed; print('deepspeed', deepspeed.__version__)"
    python3 -c "import torch, megablocks_ops, grouped_gemm; print('megablocks: ok')" || true
}

# step LIMIT LOG COMMAND...: run it, cut off at LIMIT seconds or the DEADLINE, whichever is first
FAILED=()
step() {
    local limit="$1" log="$2"; shift 2
    local left=$(( ${DEADLINE:-570} - SECONDS ))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then
        echo "gpu_session: no time left for: $*" | tee -a "$log" >&2; FAILED+=("$*"); return
    fi
    echo "gpu_session: [$SECONDS s] $* (limit ${limit} s)" >&2
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log" || FAILED+=("$*")
}

[[ "$STEP" =~ ^(test|layer|profile|memory|e2e)$ ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
setup 2>&1 | tee "$OUT/setup.log"
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
while (( $# )); do
    case "$1" in
        test)
            shift
            # every GPU-marked test (tests/gpu and the CUDA cases elsewhere), then the layer's
            # CPU-side tests on this machine's torch
            step "${TEST_TIMEOUT:-240}" "$OUT/test_gpu.log" \
                python3 -m pytest -q -ra -p no:cacheprovider -m gpu tests
            step 120 "$OUT/test_gpu.log" python3 -m pytest -q -ra -p no:cacheprovider \
                tests/unit/test_moe_efficiency.py tests/unit/test_moe_layer.py
            ;;
        layer)
            shift
            step "${LAYER_TIMEOUT:-400}" "$OUT/moe_layer.txt" \
                python3 benchmarks/moe_layer.py --profile native --out "$OUT/moe_layer.json"
            ;;
        profile)
            shift
            # eager native, native with train.compile (its first steps compile), megablocks
            for overrides in "--moe.backend=native" "--moe.backend=native --train.compile=true" \
                    "--moe.backend=megablocks"; do
                # shellcheck disable=SC2086  # the overrides split into arguments on purpose
                step "${PROFILE_TIMEOUT:-150}" "$OUT/profile.txt" \
                    python3 benchmarks/profile_step.py -- $overrides
            done
            ;;
        memory)
            shift
            step "${MEMORY_TIMEOUT:-240}" "$OUT/activation_memory.txt" \
                python3 benchmarks/activation_memory.py --json "$OUT/activation_memory.json"
            ;;
        e2e)
            shift
            steps=100
            if [[ "${1:-}" =~ ^[0-9]+$ ]]; then steps="$1"; shift; fi
            # 180 s per backend at most: three backends stay inside one 10-minute call. The run
            # dirs stay on the machine; the table and the JSON come back (a failed run's log tail too).
            step "${E2E_TIMEOUT:-560}" "$OUT/e2e.txt" python3 benchmarks/e2e.py --steps "$steps" \
                --timeout "${E2E_RUN_TIMEOUT:-180}" --out /tmp/e2e "$@"
            cp /tmp/e2e/e2e.json "$OUT/" 2>/dev/null || true
            for d in /tmp/e2e/e2e_*/; do
                b="$(basename "$d")"
                [[ -f "$d/summary.json" ]] || tail -n 40 "$d/launch.log" > "$OUT/${b}_log_tail.txt" || true
            done
            break
            ;;
        *) die "unknown step $1 (test, layer, profile, memory, e2e)";;
    esac
done
if (( ${#FAILED[@]} )); then
    echo "gpu_session: failed or cut off: ${FAILED[*]}" >&2
    exit 1
fi

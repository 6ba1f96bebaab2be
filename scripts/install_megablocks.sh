#!/usr/bin/env bash
# Install MegaBlocks 0.10.0 (dropless MoE kernels), grouped_gemm 0.3.0 and stanford-stk 0.7.1
# for moe.backend=megablocks, built against the torch that is already installed.
#
#   scripts/install_megablocks.sh [--prepare-only] [SRC_DIR]
#
# SRC_DIR (default: .gpu_wheels/ in this checkout, which git ignores) holds the source tarballs
#   megablocks-0.10.0.tar.gz  grouped_gemm-0.3.0.tar.gz  stanford_stk-0.7.1.tar.gz
# A tarball missing there is downloaded from a simple index that speaks JSON (PEP 691):
# PYPI_SIMPLE_URL, else PIP_INDEX_URL, else https://pypi.org/simple. Only the file is fetched,
# no setup.py runs, so this works on any machine.
# Every tarball must match its PyPI sha256.
# --prepare-only stops after unpacking and patching the sources into BUILD_DIR (kept).
#
# Environment:
#   PYTHON                interpreter whose torch is built against (default: python3)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default: 9.0, H100/H200)
#   MAX_JOBS              parallel compile jobs (torch's cpp_extension default otherwise)
#   BUILD_DIR             where sources are unpacked (default: a temporary dir, removed after)
#   WHEEL_DIR             if set, also keep the built wheels there, so a later machine with the
#                         same torch and CUDA can `pip install --no-deps` them without building
#   PIP_INSTALL_ARGS      more arguments for the pip installs, e.g. "--target /tmp/site" (then
#                         put that folder on PYTHONPATH: the import check at the end needs it)
#
# Why not `pip install megablocks`: 0.10.0 pins torch==2.7.0, so pip would replace the torch
# that is there; every package goes in with --no-deps --no-build-isolation instead. And its
# CUDA extension does not compile with CUDA 13's CUB, which dropped the `debug_synchronous`
# argument of cub::DeviceScan::{Exclusive,Inclusive}Sum: patch_cumsum below removes it (two
# call sites, two parameter declarations in csrc/cumsum.h). The shorter overloads exist in
# older CUB too, so the patch is applied whatever the CUDA version. grouped_gemm takes about
# 3 minutes to compile (CUTLASS).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREPARE_ONLY=0
if [[ "${1:-}" == "--prepare-only" ]]; then PREPARE_ONLY=1; shift; fi
if [[ $# -gt 1 || "${1:-}" == -* ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
SRC_DIR="${1:-$ROOT/.gpu_wheels}"
PYTHON="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

# name | tarball | top directory inside it | pip requirement | sha256 (as listed on PyPI)
PACKAGES=(
    "stanford-stk|stanford_stk-0.7.1.tar.gz|stanford_stk-0.7.1|stanford-stk==0.7.1|fc46140c2572ee9c008b2ac67ee6656f63f49c1074da8aea0923fa8290702871"
    "grouped_gemm|grouped_gemm-0.3.0.tar.gz|grouped_gemm-0.3.0|grouped_gemm==0.3.0|f0555da33a975610e9160f52449082c5e699525524581a0e5f990b14b02676a3"
    "megablocks|megablocks-0.10.0.tar.gz|megablocks-0.10.0|megablocks==0.10.0|956fd9880fa869f7468da125da230733d5f84e10a9f8c2991e5e16523c6fe1e0"
)

die() { echo "install_megablocks: $*" >&2; exit 1; }
say() { echo "install_megablocks: $*"; }

check_python() {
    # torch must be a CUDA build with a CUDA toolkit to compile against; MegaBlocks' setup.py
    # silently skips its CUDA ops unless torch.__version__ contains "cu", so refuse that here.
    "$PYTHON" - <<'EOF' || die "the environment above cannot build MegaBlocks (PYTHON=$PYTHON)"
import importlib.util, sys
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
except ImportError as exc:
    sys.exit(f"torch is not importable: {exc}")
problems = []
if torch.version.cuda is None:
    problems.append(f"torch {torch.__version__} is not a CUDA build")
elif "cu" not in torch.__version__:
    problems.append(f"torch.__version__ ({torch.__version__}) lacks 'cu': MegaBlocks' setup.py "
                    "would skip its CUDA extension")
if CUDA_HOME is None:
    problems.append("no CUDA toolkit found (set CUDA_HOME; nvcc is needed)")
missing = [m for m in ("numpy", "packaging", "triton") if importlib.util.find_spec(m) is None]
if missing:
    problems.append(f"missing runtime dependencies (installed with --no-deps, so not pulled in): {', '.join(missing)}")
for p in problems:
    print(f"install_megablocks: {p}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"install_megablocks: building against torch {torch.__version__} (CUDA {torch.version.cuda}) at {CUDA_HOME}")
EOF
}

download() {  # download TARBALL DEST: the sdist named TARBALL from a PEP 691 (JSON) simple index
    "$PYTHON" - "$1" "$2" "${PYPI_SIMPLE_URL:-${PIP_INDEX_URL:-https://pypi.org/simple}}" <<'EOF'
import json, re, sys, urllib.parse, urllib.request
tarball, dest, index = sys.argv[1:4]
project = re.sub(r"[-_.]+", "-", tarball.rsplit("-", 1)[0]).lower()  # PEP 503 name
page = f"{index.rstrip('/')}/{project}/"
request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
try:
    with urllib.request.urlopen(request, timeout=60) as response:
        kind = response.headers.get("Content-Type", "")
        if "json" not in kind:
            sys.exit(f"install_megablocks: {page} answered {kind or 'no content type'}, not the "
                     "JSON simple API (PEP 691); put the tarball in the source dir instead")
        files = json.load(response)["files"]
    urls = [urllib.parse.urljoin(page, f["url"]) for f in files if f["filename"] == tarball]
    if not urls:
        sys.exit(f"install_megablocks: {page} lists no {tarball}")
    with urllib.request.urlopen(urls[0], timeout=300) as response, open(dest, "wb") as out:
        out.write(response.read())
except OSError as exc:  # URLError, HTTPError, timeouts
    sys.exit(f"install_megablocks: downloading {tarball} from {page} failed: {exc}")
EOF
}

fetch() {  # fetch TARBALL SHA256 -> prints the path of a verified tarball
    local tarball="$1" sha="$2" path="$SRC_DIR/$1"
    if [[ ! -f "$path" ]]; then
        say "$tarball not in $SRC_DIR; downloading it from PyPI" >&2
        mkdir -p "$BUILD_DIR/downloads"
        path="$BUILD_DIR/downloads/$tarball"
        download "$tarball" "$path" >&2 || die "$tarball is not in $SRC_DIR and could not be downloaded from PyPI"
    fi
    echo "$sha  $path" | sha256sum --check --status \
        || die "$path does not match the sha256 of $tarball on PyPI ($sha)"
    echo "$path"
}

patch_cumsum() {  # idempotent; fails unless it finds the 0.10.0 text or the patched text
    "$PYTHON" - "$1" <<'EOF'
import pathlib, re, sys
path = pathlib.Path(sys.argv[1])
text = path.read_text()
if "debug_synchronous" not in text:
    if len(re.findall(r"cudaStream_t\s+stream\s*=\s*0\s*\)", text)) == 2:
        print(f"install_megablocks: {path} is already patched")
        sys.exit(0)
    sys.exit(f"install_megablocks: {path} holds neither MegaBlocks 0.10.0's debug_synchronous "
             "arguments nor the patched text; not patching")
new, params = re.subn(r",\s*bool\s+debug_synchronous\s*=\s*false\s*\)", ")", text)
new, calls = re.subn(r",\s*debug_synchronous\s*\)", ")", new)
if (params, calls) != (2, 2) or "debug_synchronous" in new:
    sys.exit(f"install_megablocks: {path}: expected 2 parameter declarations and 2 call sites "
             f"of debug_synchronous, found {params} and {calls}; not patching")
path.write_text(new)
print(f"install_megablocks: removed debug_synchronous from {path} (2 declarations, 2 calls)")
EOF
}

[[ "$PREPARE_ONLY" == 1 ]] || check_python
if [[ -z "${BUILD_DIR:-}" ]]; then
    BUILD_DIR="$(mktemp -d -t megablocks-build.XXXXXX)"
    [[ "$PREPARE_ONLY" == 1 ]] || trap 'rm -rf "$BUILD_DIR"' EXIT
fi
mkdir -p "$BUILD_DIR/src"

SOURCES=()
for entry in "${PACKAGES[@]}"; do
    IFS='|' read -r name tarball top spec sha <<<"$entry"
    path="$(fetch "$tarball" "$sha")"
    rm -rf "${BUILD_DIR:?}/src/$top"
    tar -xzf "$path" -C "$BUILD_DIR/src"
    [[ -d "$BUILD_DIR/src/$top" ]] || die "$tarball did not unpack to $top/"
    if [[ "$name" == megablocks ]]; then
        patch_cumsum "$BUILD_DIR/src/$top/csrc/cumsum.h" || die "patching $tarball failed"
    fi
    SOURCES+=("$name|$BUILD_DIR/src/$top|${spec##*==}")
done

if [[ "$PREPARE_ONLY" == 1 ]]; then
    say "sources verified, unpacked and patched in $BUILD_DIR/src (--prepare-only: not built)"
    exit 0
fi

# stanford-stk first: megablocks imports it. TORCH_CUDA_ARCH_LIST also keeps the setup.py
# files from asking the GPU for its architecture, so this builds on a machine without one.
say "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
for entry in "${SOURCES[@]}"; do
    IFS='|' read -r name dir version <<<"$entry"
    say "building and installing $name (--no-deps --no-build-isolation)"
    if [[ -n "${WHEEL_DIR:-}" ]]; then
        mkdir -p "$WHEEL_DIR"
        "$PYTHON" -m pip wheel --no-index --no-deps --no-build-isolation -w "$WHEEL_DIR" "$dir" \
            || die "pip wheel of $name from $dir failed"
        # this version's wheel only: WHEEL_DIR may hold others from earlier builds
        wheel=("$WHEEL_DIR"/"${name//-/_}-$version"-*.whl)
        [[ -f "${wheel[0]}" ]] || die "pip wheel of $name left no ${name//-/_}-$version-*.whl in $WHEEL_DIR"
        # shellcheck disable=SC2086  # PIP_INSTALL_ARGS is a list of words
        "$PYTHON" -m pip install --no-index --no-deps ${PIP_INSTALL_ARGS:-} "${wheel[0]}" \
            || die "pip install of ${wheel[0]} failed"
    else
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation ${PIP_INSTALL_ARGS:-} "$dir" \
            || die "pip install of $name from $dir failed"
    fi
done

# Verify from outside the source tree, so the installed packages are the ones imported.
cd /
"$PYTHON" -c "import torch; import megablocks_ops; import grouped_gemm; from megablocks.layers.dmoe import ParallelDroplessMLP; from megablocks.layers.glu import GroupedGLU; from megablocks._version import __version__ as v; print(f'install_megablocks: megablocks {v} with its CUDA ops and grouped_gemm import against torch {torch.__version__}')" \
    || die "installed, but the import check failed (see the traceback above)"

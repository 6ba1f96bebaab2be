"""MegaBlocks on CPU, for tests: its own Python over reference versions of its CUDA parts.

What runs, and whose it is:
- MegaBlocks 0.10.0's Python (ParallelDroplessMLP: grouped_forward_once, parallel_forward_once
  with its all-to-alls, ops.gather/scatter and their autograd), stanford-stk 0.7.1, and
  grouped_gemm 0.3.0's Python (its autograd function and backward): unchanged, unpacked from
  the PyPI sdists that scripts/install_megablocks.sh verifies (`--prepare-only`, no build).
- MegaBlocks' Triton kernels (gather, scatter, scatter_wgrad): unchanged, in Triton's
  interpreter (TRITON_INTERPRET=1), with each autotuned kernel held to one configuration (the
  interpreter cannot time configurations; the result does not depend on the block size).
  Triton 3.9: 3.6, the GPU machine's, fails in its interpreter on these kernels with numpy 2.
- The two compiled extensions, `megablocks_ops` (radix sort, histogram, cumsums, replicate)
  and `grouped_gemm_backend` (the grouped GEMM): reference implementations in plain torch
  (extensions/ here), with the originals' argument checks and dtypes.

So the megablocks backend's wiring into MegaBlocks (attributes of the pipeline built without
its __init__, call signatures, the weight layout, expert parallelism over our groups, where
gradients land) is exercised on every `make test`. The compiled kernels are not: that is what
tests/gpu/test_megablocks.py adds on a GPU.

`make megablocks-reference` (which `make test` runs first) prepares PREPARED; activate() puts
it on sys.path. Call activate() in a process of its own (tests spawn one): it switches
Triton to its interpreter for the whole process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PREPARED = ROOT / ".cache" / "megablocks-reference"
PATHS = (
    Path(__file__).resolve().parent / "extensions",  # megablocks_ops, grouped_gemm_backend
    PREPARED / "src" / "megablocks-0.10.0",
    PREPARED / "src" / "grouped_gemm-0.3.0",
    PREPARED / "src" / "stanford_stk-0.7.1",
    PREPARED / "site",  # triton
)


def unavailable() -> str | None:
    """Why the reference environment cannot be activated here, in a line; None if it can."""
    if not (PREPARED / ".ready").is_file():
        return f"{PREPARED.relative_to(ROOT)} is not prepared: run `make megablocks-reference` (make test does)"
    missing = [str(p) for p in PATHS if not p.is_dir()]
    if missing:
        return f"missing from the prepared reference environment: {', '.join(missing)}"
    return None


def activate() -> None:
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    if "triton" in sys.modules or "megablocks" in sys.modules:
        raise RuntimeError("activate() must run before anything imports triton or megablocks")
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path[:0] = [str(p) for p in PATHS]
    import triton
    from megablocks.backend import kernels

    for kernel in vars(kernels).values():
        if isinstance(kernel, triton.runtime.Autotuner):
            kernel.configs = [max(kernel.configs, key=lambda c: c.kwargs.get("BLOCK_X", 0))]

"""The hardware figures the modelled step time divides by: stated, with presets and overrides.

Presets are vendor figures for one SXM GPU in an 8-GPU HGX node with one 400 Gb/s InfiniBand
NIC per GPU (NVIDIA's H100 and H200 datasheets): dense bf16 tensor-core peak (without
sparsity, as model/flops.py's MFU table), HBM bandwidth, NVLink 4 at 900 GB/s both ways (450
each way), the NIC at 50 GB/s each way, and the memory a process can allocate (what
nvidia-smi reports as total). The efficiencies and latencies are assumptions of the model, not
measurements: every one can be overridden on the command line (launcher/plan.py).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from model.errors import ConfigError

GiB = 1 << 30


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float
    """Dense bf16 peak of one GPU (the MFU denominator)."""
    memory_gib: float
    """Memory one process may fill."""
    hbm_tbps: float
    """HBM bandwidth, TB/s (the optimizer step's reads and writes)."""
    intra_gbps: float
    """GPU-to-GPU bandwidth inside a node, each way, GB/s."""
    inter_gbps: float
    """Per-GPU bandwidth between nodes, each way, GB/s."""
    matmul_efficiency: float = 0.5
    """Fraction of peak the model's arithmetic reaches (an assumption: fused attention and
    grouped GEMMs at these shapes; the measured MFU of configs/gpu_moe_1b.yaml was lower)."""
    link_efficiency: float = 0.8
    """Fraction of a link's bandwidth a collective reaches (NCCL's bus bandwidth)."""
    intra_latency_us: float = 10.0
    inter_latency_us: float = 20.0

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GiB


PRESETS = {
    "h100": Hardware("H100 SXM 80GB", peak_tflops=989.0, memory_gib=79.6, hbm_tbps=3.35,
                     intra_gbps=450.0, inter_gbps=50.0),
    "h200": Hardware("H200 SXM 141GB", peak_tflops=989.0, memory_gib=140.4, hbm_tbps=4.8,
                     intra_gbps=450.0, inter_gbps=50.0),
}


def parse_bytes(text: str) -> float:
    """'80GiB', '80GB', '141 GiB', '8e10' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B)?\s*", text)
    if not match:
        raise ConfigError(f"--gpu-memory ({text!r}) must be a size such as 80GiB or 80GB")
    units = {None: 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    return float(match.group(1)) * units[match.group(2)]


def hardware(preset: str = "h100", **overrides) -> Hardware:
    """A preset with some figures replaced (None leaves a figure as it is)."""
    if preset not in PRESETS:
        raise ConfigError(f"--hardware ({preset!r}) must be one of {', '.join(PRESETS)}")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(Hardware)}
    unknown = set(chosen) - fields
    if unknown:
        raise ConfigError(f"unknown hardware figures: {', '.join(sorted(unknown))}")
    for name, value in chosen.items():
        if not value > 0:
            raise ConfigError(f"hardware figure {name} ({value}) must be > 0")
    for name in ("matmul_efficiency", "link_efficiency"):
        if chosen.get(name, 0) > 1:
            raise ConfigError(f"{name} ({chosen[name]}) must be at most 1")
    return dataclasses.replace(PRESETS[preset], **chosen)

"""Mixture-of-Experts layers. Backends share one interface (MoELayer) and the canonical weights."""

from __future__ import annotations

from model.config import MoEConfig
from model.moe.layer import MoELayer
from model.moe.native_backend import NativeMoE
from model.moe.router import RouterOutput

__all__ = ["MoELayer", "NativeMoE", "RouterOutput", "build_moe"]


def build_moe(dim: int, cfg: MoEConfig) -> MoELayer:
    """The MoE layer for `cfg.backend` (validated by MoEConfig). Each backend's kernel
    imports stay inside its own module, imported only when it is chosen."""
    if cfg.backend == "deepspeed":
        from model.moe.deepspeed_backend import DeepSpeedMoE

        return DeepSpeedMoE(dim, cfg)
    if cfg.backend == "megablocks":
        from model.moe.megablocks_backend import MegaBlocksMoE

        return MegaBlocksMoE(dim, cfg)
    return NativeMoE(dim, cfg)

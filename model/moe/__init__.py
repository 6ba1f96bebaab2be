"""Mixture-of-Experts layers. Backends share one interface and the canonical weights."""

from model.moe.layer import MoELayer
from model.moe.router import RouterOutput

__all__ = ["MoELayer", "RouterOutput", "build_moe"]


def build_moe(dim, cfg):
    """The MoE layer for `cfg.backend`; config validation has already checked the name."""
    if cfg.backend == "native":
        return MoELayer(dim, cfg)
    raise ValueError(f"moe.backend ({cfg.backend!r}) has no implementation")

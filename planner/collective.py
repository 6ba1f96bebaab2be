"""One collective of a training step as the planner counts it: kind, group, bytes, calls."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Collective:
    op: str
    """all_reduce, all_gather, all_to_all, reduce_scatter."""
    group: str
    """dp, tp, ep, edp or world."""
    nbytes: float
    count: int
    what: str
    via: str = "ours"
    """ours (parallel/collectives.py), DeepSpeed or FSDP2."""

    @property
    def total(self) -> float:
        return self.nbytes * self.count

"""One topology object: the parallel degrees, this rank's coordinates, and the process groups.

Rank order (dense layout world = dp x tp, tensor-parallel ranks adjacent):

    rank = dp_rank * tp + tp_rank

Expert layout over the same world: among the ranks that share a tp_rank (one data-parallel
"column"), consecutive dp ranks form an expert-parallel group, so the heavy all-to-all stays
between neighbouring ranks (within a node when ranks fill nodes in order):

    dp_rank = edp_rank * ep + ep_rank

Experts are not split by tp, so all ranks with the same ep_rank hold the same experts, tp
partners included, and form the expert-data-parallel group, of size edp = world / ep
(= dp / ep * tp). Each of them routes different tokens (tp ranks take disjoint token slices),
so expert gradients are summed over that whole group.

Example, world 8, tp 1, ep 4: ep groups [0,1,2,3] [4,5,6,7]; edp groups [0,4] [1,5] [2,6]
[3,7]; dp group [0..7]. World 8, tp 2, ep 2 (dp 4): tp groups [0,1] [2,3] [4,5] [6,7];
dp groups [0,2,4,6] [1,3,5,7]; ep groups [0,2] [4,6] [1,3] [5,7]; edp groups [0,1,4,5]
[2,3,6,7].

`Layout` is the pure, validated arithmetic (usable before any process group exists);
`Topology` adds the groups and is created once by the launcher, after validation.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch.distributed as dist

from model.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    world_size: int
    dp: int
    ep: int
    tp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "dp", "ep", "tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.dp * self.tp != self.world_size:
            raise ConfigError(
                f"WORLD_SIZE ({self.world_size}) must equal parallel.dp ({self.dp}) "
                f"x tp ({self.tp})"
            )
        if self.dp % self.ep:
            raise ConfigError(
                f"parallel.ep ({self.ep}) must divide parallel.dp ({self.dp}): expert-parallel "
                "groups are carved out of the data-parallel ranks"
            )

    @classmethod
    def of(cls, world_size: int, dp: int | None, tp: int, ep: int) -> Layout:
        """The layout of parallel.dp (None: WORLD_SIZE / tp), tp and ep on `world_size` ranks:
        the one place that checks world = dp x tp."""
        if dp is None and tp >= 1 and world_size % tp:
            raise ConfigError(f"WORLD_SIZE ({world_size}) must be divisible by parallel.tp ({tp})")
        return cls(world_size=world_size, dp=world_size // tp if dp is None else dp, ep=ep, tp=tp)

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: replicas of each expert (tp partners included)."""
        return self.world_size // self.ep

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's position along each axis (its rank inside each kind of group)."""
        dp_rank, tp_rank = divmod(rank, self.tp)
        ep_group, ep_rank = divmod(dp_rank, self.ep)
        return {"dp": dp_rank, "tp": tp_rank, "ep": ep_rank, "ep_group": ep_group,
                "edp": ep_group * self.tp + tp_rank}

    def group_ranks(self, name: str) -> list[list[int]]:
        """Every group of kind `name` ("dp", "tp", "ep", "edp") as sorted rank lists."""
        keep = {"dp": ("tp",), "tp": ("dp",), "ep": ("tp", "ep_group"), "edp": ("ep",)}[name]
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)
            groups.setdefault(tuple(c[k] for k in keep), []).append(rank)
        return sorted(groups.values())


@dataclass
class Topology:
    """The layout, this rank's coordinates and its groups by name: dp, tp, ep, edp."""

    layout: Layout
    rank: int
    groups: dict[str, dist.ProcessGroup] = field(repr=False)

    @classmethod
    def create(cls, layout: Layout, timeout_s: float | None = None) -> Topology:
        """Collective: every rank must call it (torch.distributed.new_group is collective).

        Each group carries its name (errors from parallel.collectives show it) and `timeout_s`
        (parallel.timeout_s): a subgroup does not inherit the world group's timeout, so without
        it a stalled peer would hang its group for torch's default of 30 minutes."""
        rank = dist.get_rank()
        if dist.get_world_size() != layout.world_size:
            raise ConfigError(
                f"process group world size ({dist.get_world_size()}) != layout world size "
                f"({layout.world_size})"
            )
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        groups: dict[str, dist.ProcessGroup] = {}
        for name in ("dp", "tp", "ep", "edp"):
            for ranks in layout.group_ranks(name):
                # every rank creates every group, in the same order
                group = dist.new_group(ranks, timeout=timeout, group_desc=name)
                if rank in ranks:
                    groups[name] = group
        return cls(layout, rank, groups)

    def coord(self, name: str) -> int:
        return self.layout.coords(self.rank)[name]

    def size(self, name: str) -> int:
        return {"dp": self.layout.dp, "tp": self.layout.tp, "ep": self.layout.ep,
                "edp": self.layout.edp}[name]

    def describe(self) -> str:
        lay = self.layout
        return (f"world {lay.world_size} = dp {lay.dp} x tp {lay.tp}; ep {lay.ep}, "
                f"edp {lay.edp}")

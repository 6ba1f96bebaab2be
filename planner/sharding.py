"""How ZeRO lays this rank's parameters out: DeepSpeed's flat groups (stages 1, 2) and FSDP2's
per-parameter shards (stage 3). Pure arithmetic on planner/params.py's list.

DeepSpeed 0.19.8 (deepspeed/moe/utils.py, runtime/zero/stage_1_and_2.py), as parallel/zero.py
configures it:
- groups: trainer.optim.param_groups' decay (matrices) and no_decay (gains), each without its
  expert parameters, then the expert parameters of each, cut greedily into groups of at most
  178,956,971 elements (split_params_into_different_moe_groups_for_optimizer's max_group_size);
- each group is flattened into one buffer padded to a multiple of 2 x its world (dp for dense,
  edp for experts; nccl_start_alignment_factor 2), which the parameters become views of; each
  rank owns an equal partition of it: an fp32 copy (the master weights) and Adam's two moments;
- after backward each rank keeps the gradients of the parameters that overlap its partition,
  whole (copy_grads_in_partition), plus zeros for the part of the partition no parameter
  covers (the padding): what the step reads.
FSDP2 (parallel/fsdp.py): each parameter is cut on one dim into world-many
chunks of ceil(n / world) (the last ones shorter, the storage padded to the full chunk).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from planner.params import Param

MAX_EXPERT_GROUP = 178_956_971  # DeepSpeed's max_group_size for MoE groups
ALIGNMENT = 2  # nccl_start_alignment_factor


def reduce_bucket(params: list[Param]) -> int:
    """parallel/zero.py's reduce_bucket_size: DeepSpeed's 5e8 elements, or this rank's
    parameters if fewer (so a small model's bucket is not gigabytes)."""
    from parallel.zero import DEEPSPEED_BUCKET

    return min(DEEPSPEED_BUCKET, sum(p.numel for p in params))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class FlatGroup:
    """One DeepSpeed parameter group as this rank sees it."""

    name: str
    expert: bool
    numels: tuple[int, ...]
    world: int
    """Ranks that share it: dp (dense) or edp (experts)."""

    @functools.cached_property
    def numel(self) -> int:
        return sum(self.numels)

    @functools.cached_property
    def padded(self) -> int:
        return _ceil_div(self.numel, ALIGNMENT * self.world) * ALIGNMENT * self.world

    @functools.cached_property
    def partition(self) -> int:
        return self.padded // self.world

    @functools.cached_property
    def held_by_part(self) -> np.ndarray:
        """Gradient elements kept for the step by the owner of each partition: every parameter
        overlapping it, whole, and zeros for what no parameter covers (its padding)."""
        ends = np.cumsum(np.asarray(self.numels, dtype=np.int64))
        starts = ends - np.asarray(self.numels, dtype=np.int64)
        lo = np.arange(self.world, dtype=np.int64) * self.partition
        hi = lo + self.partition
        # Parameters overlapping [lo, hi): those ending after lo and starting before hi.
        first = np.searchsorted(ends, lo, side="right")
        last = np.searchsorted(starts, hi, side="left")  # one past the last
        before = np.concatenate([[0], ends])
        whole = np.where(last > first, before[last] - before[np.minimum(first, len(ends))], 0)
        covered = np.clip(self.numel - lo, 0, self.partition)
        return whole + self.partition - covered

    def grads_held(self, part: int) -> int:
        return int(self.held_by_part[part])


# A search plans one parameter list (planner/params.py keeps them) at many layouts. The list
# is kept with its groups, so its id cannot be reused by another list while cached.
_GROUPS: dict[tuple[int, int, int], tuple[list[Param], list[FlatGroup]]] = {}


def deepspeed_groups(params: list[Param], dp: int, edp: int) -> list[FlatGroup]:
    """The groups in DeepSpeed's order: dense decay, dense no_decay, then the expert chunks."""
    key = (id(params), dp, edp)
    if key not in _GROUPS or _GROUPS[key][0] is not params:
        _GROUPS[key] = (params, _groups(params, dp, edp))
    return _GROUPS[key][1]


def _groups(params: list[Param], dp: int, edp: int) -> list[FlatGroup]:
    groups = []
    for decay in (True, False):
        kind = "decay" if decay else "no_decay"
        groups.append(FlatGroup(f"dense {kind}", False,
                                tuple(p.numel for p in params if p.decays == decay and not p.expert), dp))
    for decay in (True, False):
        chunks: list[list[int]] = []
        current: list[int] = []
        size = 0
        for p in params:
            if not p.expert or p.decays != decay:
                continue
            if size + p.numel <= MAX_EXPERT_GROUP:
                current.append(p.numel)
                size += p.numel
            else:  # as DeepSpeed does it, an empty chunk first if one tensor is larger
                chunks.append(current)
                current, size = [p.numel], p.numel
        if current:
            chunks.append(current)
        groups += [FlatGroup(f"experts {'decay' if decay else 'no_decay'} {i}", True, tuple(c), edp)
                   for i, c in enumerate(chunks)]
    return groups


def fsdp_shard(p: Param, world: int, part: int, dim: int = 0) -> tuple[int, int]:
    """(this rank's elements, its padded storage) of `p` cut on `dim` over `world` ranks."""
    rest = p.numel // p.shape[dim]
    chunk = _ceil_div(p.shape[dim], world)
    rows = min(max(p.shape[dim] - part * chunk, 0), chunk)
    return rows * rest, chunk * rest


def fsdp_unit(name: str, tied: bool) -> str:
    """The FSDP2 unit a parameter belongs to (parallel/fsdp.py): its block, the embedding, the
    output end (final norm and output), or with tied embeddings the root (embedding and norm)."""
    if name.startswith("layers."):
        return ".".join(name.split(".")[:2])
    if name in ("norm.weight", "output.weight"):
        return "root" if tied else "output end"
    return "root" if tied else name


def expert_shard_dim(shape: tuple[int, ...], edp: int) -> int:
    """parallel/fsdp.py's choice: the first dim edp divides, else 0."""
    return next((d for d, n in enumerate(shape) if n % edp == 0), 0)

"""Parameters, gradients, optimizer state and master weights on one rank, by ZeRO stage.

As the trainer runs each stage (trainer/optim.py, parallel/zero.py, parallel/fsdp.py):
  0  every parameter of this rank (tp and ep slices) in fp32, its fp32 gradient and AdamW's
     two fp32 moments;
  1-2  DeepSpeed's flat groups (planner/sharding.py): the parameters as views of padded flat
     buffers (bf16 in its bf16 mode), this rank's partition of them in fp32 (master weights)
     with Adam's moments, and the gradients of the parameters overlapping the partition, whole,
     in the parameters' dtype. Stage 1 and 2 hold the same at the step; they differ during
     backward (planner/memory.py);
  3  FSDP2 (parallel/fsdp.py): each fp32 parameter cut over
     dp (experts over edp, on the first dim edp divides), storage padded to equal chunks, the
     gradients too (views of the padded reduce-scatter output), the moments of the unpadded
     shard. The fp32 shards are the master weights.
Adam's step counters (0-d tensors) are left out. `part`: this rank's index in each group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.params import Param, parameters
from planner.shapes import FP32, Shapes
from planner.sharding import FlatGroup, deepspeed_groups, expert_shard_dim, fsdp_shard

ADAM_MOMENTS = 2
@dataclass(frozen=True)
class ModelStates:
    params: int
    grads: int
    optimizer: int
    master: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.master


def model_states(s: Shapes, rank: int = 0, params: list[Param] | None = None,
                 groups: list[FlatGroup] | None = None) -> ModelStates:
    """The four on global rank `rank` (they differ by rank only at stages 1-3). `groups`:
    deepspeed_groups(params, ...) when the caller has them already."""
    params = parameters(s) if params is None else params
    stage, p = s.job.parallel.zero_stage, s.precision
    if stage == 0:
        n = sum(q.numel for q in params)
        return ModelStates(n * FP32, n * FP32, ADAM_MOMENTS * n * FP32, 0)
    coords = s.layout.coords(rank)
    if stage == 3:
        return _fsdp(s, params, coords)
    groups = deepspeed_groups(params, s.layout.dp, s.layout.edp) if groups is None else groups
    parts = [coords["edp"] if g.expert else coords["dp"] for g in groups]
    owned = sum(g.partition for g in groups)
    return ModelStates(sum(g.padded for g in groups) * p.param,
                       sum(g.grads_held(i) for g, i in zip(groups, parts)) * p.grad,
                       ADAM_MOMENTS * owned * FP32, owned * FP32)


def _fsdp(s: Shapes, params: list[Param], coords: dict[str, int]) -> ModelStates:
    dp, edp = s.layout.dp, s.layout.edp
    local = stored = 0
    for q in params:
        world, part = (edp, coords["edp"]) if q.expert else (dp, coords["dp"])
        dim = expert_shard_dim(q.shape, world) if q.expert else 0
        mine, padded = fsdp_shard(q, world, part, dim)
        local, stored = local + mine, stored + padded
    # The reduce-scattered gradients are views of FSDP2's padded output buffer; Adam's moments
    # are made like the unpadded local shard.
    return ModelStates(stored * FP32, stored * FP32, ADAM_MOMENTS * local * FP32, 0)


def busiest(s: Shapes, params: list[Param] | None = None) -> tuple[int, ModelStates]:
    """(rank, its states) of the rank holding the most. Stage 0 holds the same everywhere;
    stage 3's rank 0 holds a full chunk of every parameter (the short chunks are the last
    ranks'); at stages 1-2 only the gradients differ, by the rank's dense partition (its dp
    index) and expert partition (its edp index): each is computed once, then every rank."""
    params = parameters(s) if params is None else params
    if s.job.parallel.zero_stage in (0, 3):
        return 0, model_states(s, 0, params)
    lay = s.layout
    groups = deepspeed_groups(params, lay.dp, lay.edp)
    dense = sum((g.held_by_part for g in groups if not g.expert), np.zeros(lay.dp, dtype=np.int64))
    expert = sum((g.held_by_part for g in groups if g.expert), np.zeros(lay.edp, dtype=np.int64))

    def held(rank: int) -> int:
        c = lay.coords(rank)
        return int(dense[c["dp"]] + expert[c["edp"]])

    rank = max(range(lay.world_size), key=held)
    return rank, model_states(s, rank, params, groups)

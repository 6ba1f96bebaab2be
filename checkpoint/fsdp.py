"""zero_stage 3 (FSDP2) in checkpoints: each rank's DTensor shards as blocks of the global tensors.

FSDP makes every parameter a DTensor over the dp mesh (experts: the edp mesh) whose global
shape is the tp/ep-local tensor. So this rank's block of the global tensor is the box tp and
ep give it (checkpoint/layout.py) refined by the FSDP chunk: the chunk's offset and shape
inside the tp/ep-local tensor (torch's compute_local_shape_and_global_offset, as
torch.distributed.checkpoint computes it), shifted by the box's offset.

Who writes: across the world, each block of an expert or tp-split parameter has exactly one
holder; a dense parameter tp does not split is held once per tp column, and tp rank 0's copy
is written. Adam's moments are DTensors sharded like their parameters, so they are the same
blocks (checkpoint/optimizer.py writes and reads them through `local_block` and `like_param`).
The sharded fp32 parameters are the master weights (MixedPrecisionPolicy gathers bf16 copies
for compute): they are stored as model/<param>, with no master/ copy. The format is the one
every stage writes, so a stage 3 checkpoint loads at any layout and stage, and back.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from checkpoint.layout import Box, Shard, local_block, tp_ep_shards
from parallel.fsdp import reshard
from parallel.topology import Topology


def fsdp_shards(model: nn.Module, topology: Topology) -> list[Shard]:
    """Every parameter of the fully sharded model: this rank's FSDP shard and its block.
    Resharding first (no collective): a unit kept gathered after a forward would register
    its whole tensors in place of the shards."""
    reshard(model)
    out = []
    for s in tp_ep_shards(model, topology):
        p = s.param
        if not isinstance(p, DTensor):
            raise TypeError(f"{s.name} is a {type(p).__name__}, not FSDP's DTensor shard: "
                            "apply_fully_shard left it out")
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if tuple(shape) != tuple(local_block(p).shape):
            raise RuntimeError(f"{s.name}: FSDP's local shard {tuple(local_block(p).shape)} is "
                               f"not the DTensor block {tuple(shape)} (a torch change?)")
        box = Box(tuple(o + b for o, b in zip(offset, s.box.offsets)), tuple(shape))
        holders = "none" if s.replicated_over != "world" else "tp"
        out.append(Shard(s.name, p, s.global_shape, box, holders))
    return out


def like_param(param: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` (this rank's block) as optimizer state for `param`: on its device and in its
    dtype, and for a DTensor parameter a DTensor sharded like it."""
    if not isinstance(param, DTensor):
        return values.to(param.device, param.dtype)
    local = values.to(local_block(param).device, param.dtype)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())

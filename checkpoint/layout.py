"""Where each rank's piece of a parameter sits in the global tensor, and who writes it.

A checkpoint stores every tensor at its global shape as a set of pieces. A piece is a `Box`
(the block of the global tensor one rank holds: its tensor-parallel or expert-parallel slice)
and a flat range inside that box (the whole box, or the fragment of it that a ZeRO partition
owns). Nothing here depends on which layout wrote a piece: loading under another layout only
intersects boxes.

    experts      dim 0 split over ep (global expert id = ep_rank * E_local + e), replicated
                 over edp (tp partners included)
    tp-sharded   dim `tp_partition_dim` split over tp, replicated over dp
    other dense  replicated over the whole world
At zero_stage 3 FSDP2 makes every parameter a DTensor over the dp mesh (experts: the edp mesh)
whose global shape is the tp/ep-local tensor, so this rank's block is the tp/ep box refined by
the FSDP chunk (torch's compute_local_shape_and_global_offset, as torch.distributed.checkpoint
computes it). Each block then has one holder, or one per tp column for the dense parameters tp
replicates (tp rank 0's is written). Adam's moments are DTensors sharded like their
parameters: the same blocks (`local_block`, `like_param`). The sharded fp32 parameters are the
master weights (MixedPrecisionPolicy gathers bf16 copies for compute): stored as model/<param>.

Pure arithmetic plus parameter attributes: no collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from parallel.expert_parallel import expert_parameter_ids
from parallel.fsdp import is_fully_sharded, reshard
from parallel.topology import Topology


@dataclass(frozen=True)
class Box:
    """A block of a global tensor: per-dim offsets and sizes."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n

    def intersect(self, other: Box) -> Box | None:
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a + s, b + t) for a, s, b, t in
                   zip(self.offsets, self.sizes, other.offsets, other.sizes))
        if any(h <= lo_ for lo_, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - lo_ for lo_, h in zip(lo, hi)))

    def slices_within(self, outer: Box) -> tuple[slice, ...]:
        """Index of this box inside a tensor that holds `outer`."""
        return tuple(slice(o - p, o - p + s) for o, s, p in zip(self.offsets, self.sizes, outer.offsets))

    def to_json(self) -> list[list[int]]:
        return [list(self.offsets), list(self.sizes)]

    @classmethod
    def from_json(cls, value) -> Box:
        return cls(tuple(value[0]), tuple(value[1]))

    @classmethod
    def whole(cls, shape) -> Box:
        return cls(tuple(0 for _ in shape), tuple(shape))


@dataclass(frozen=True)
class Shard:
    """One parameter (or persistent buffer) as this rank holds it."""

    name: str
    param: torch.Tensor
    global_shape: tuple[int, ...]
    box: Box
    # "edp" (experts), "dp" (tp-sharded dense), "world" (other dense); at zero_stage 3
    # "none" (one holder) or "tp" (dense parameters tp does not split)
    replicated_over: str

    @property
    def block(self) -> torch.Tensor:
        """This rank's values of `box`: the parameter itself, or its local shard when it is an
        FSDP (zero_stage 3) DTensor parameter; loading writes into it."""
        return local_block(self.param)

    def writes_whole(self, topology: Topology) -> bool:
        """Without ZeRO every replica holds the whole box: the first replica writes it."""
        if self.box.numel == 0:  # an FSDP shard can be empty: nothing to write
            return False
        if self.replicated_over in ("none", "tp"):
            return self.replicated_over == "none" or topology.coord("tp") == 0
        if self.replicated_over == "edp":
            return topology.coord("edp") == 0
        if self.replicated_over == "dp":
            return topology.coord("dp") == 0
        return topology.rank == 0

    def writes_partition(self, topology: Topology) -> bool:
        """Under ZeRO the partition group (dp, or edp for experts) splits the box, so each
        fragment has one owner, except that dense parameters tp does not split are
        partitioned once per tp rank: tp rank 0's copy is written."""
        return self.replicated_over != "world" or topology.coord("tp") == 0


class Piece(NamedTuple):
    """A block (or a flat fragment of a block) of a global tensor, held by this rank."""

    name: str  # e.g. "model/layers.0.ffn.experts.w1_EDF", "optim/<param>/exp_avg"
    shape: tuple[int, ...]  # the global tensor's shape
    box: Box
    flat: tuple[int, int]  # range of the row-major flattened box
    tensor: torch.Tensor  # the values: the box, or the fragment as a 1-D tensor

    @property
    def key(self) -> str:
        return f"{self.name}|{','.join(map(str, self.box.offsets))}|{self.flat[0]}"


def local_block(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (not a differentiable view: writes land in it), else `t`."""
    if isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


def shards(model: nn.Module, topology: Topology) -> list[Shard]:
    """Every parameter of the (already tp/ep-transformed, maybe fully sharded) model, in
    named_parameters order."""
    if is_fully_sharded(model):
        return fsdp_shards(model, topology)
    return tp_ep_shards(model, topology)


def tp_ep_shards(model: nn.Module, topology: Topology) -> list[Shard]:
    """The boxes tp and ep give each parameter (at zero_stage 3: each DTensor's whole)."""
    expert_ids = expert_parameter_ids(model)
    ep, tp = topology.size("ep"), topology.size("tp")
    out = []
    for name, p in model.named_parameters():
        offsets, shape = [0] * p.dim(), list(p.shape)
        if id(p) in expert_ids:
            offsets[0], shape[0] = topology.coord("ep") * p.shape[0], p.shape[0] * ep
            kind = "edp"
        elif getattr(p, "tp_partition_dim", None) is not None:
            d = p.tp_partition_dim
            offsets[d], shape[d] = topology.coord("tp") * p.shape[d], p.shape[d] * tp
            kind = "dp"
        else:
            kind = "world"
        out.append(Shard(name, p, tuple(shape), Box(tuple(offsets), tuple(p.shape)), kind))
    return out


def buffer_shards(model: nn.Module) -> list[Shard]:
    """The model's persistent buffers (state that is not trained by the optimizer, e.g. the
    routers' expert bias): replicated on every rank, stored like replicated parameters."""
    persistent = set(model.state_dict(keep_vars=True)) - {n for n, _ in model.named_parameters()}
    return [Shard(name, b, tuple(b.shape), Box.whole(b.shape), "world")
            for name, b in model.named_buffers() if name in persistent]


def fill_box(target: Box, pieces: list[tuple[Box, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor | None:
    """Assemble the block `target` from whole-box pieces that tile the global tensor.
    Returns None when the pieces leave any element of `target` uncovered."""
    out = torch.empty(target.sizes, dtype=dtype)
    covered = 0
    for box, tensor in pieces:
        common = box.intersect(target)
        if common is None:
            continue
        out[common.slices_within(target)] = tensor[common.slices_within(box)].to(dtype)
        covered += common.numel
    return out if covered == target.numel else None


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

"""Optimizer state in and out of DeepSpeed ZeRO-1/2 partitions, per parameter, read directly.

DeepSpeed flattens each parameter group (our dense groups over dp, expert groups over edp)
into one buffer: parameters in `round_robin_bit16_groups[i]` order at
`round_robin_bit16_offsets[i]`, alignment padding between and after them. Rank p of the
group's process group owns [p * partition_size[i], (p + 1) * partition_size[i]) of it: the fp32
master weights `single_partition_of_fp32_groups[i]` and, in the inner torch optimizer's state
for that tensor, Adam's `exp_avg` / `exp_avg_sq` / `step`. A parameter may straddle two
partitions; its fragment in ours is a flat range of the parameter. Padding is never stored.

We read these attributes rather than `deepspeed.utils.safe_get_full_optimizer_state`: in
DeepSpeed 0.19.8 that raised "exp_avg not found in optimizer state fragment" for expert
parameters on some ranks (CPU, gloo, ep=2, ZeRO-1 and -2), and it all-reduces whole tensors,
which a checkpoint that only writes what each rank owns does not need.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from checkpoint.layout import Piece, Shard
from checkpoint.optimizer import MOMENTS, adam_step_count, fetch_moments
from checkpoint.reader import Checkpoint, fetch_param
from parallel.topology import Topology


def fragments(zero, params: list[Shard]) -> Iterator[tuple[int, Shard, int, int, int]]:
    """(group index, parameter, start, end inside the flattened parameter, start inside this
    rank's partition) for every parameter fragment in this rank's partitions."""
    by_id = {id(s.param): s for s in params}
    for i, group in enumerate(zero.round_robin_bit16_groups):
        size = zero.partition_size[i]
        lo = dist.get_rank(group=zero.real_dp_process_group[i]) * size
        for p, offset in zip(group, zero.round_robin_bit16_offsets[i]):
            start, end = max(offset, lo), min(offset + p.numel(), lo + size)
            if start < end:
                yield i, by_id[id(p)], start - offset, end - offset, start - lo


def zero_pieces(zero, params: list[Shard], topology: Topology) -> tuple[list[Piece], int | None]:
    """This rank's fragments of the master weights (when their dtype differs from the model's)
    and of Adam's moments, and Adam's step count (None before the first step)."""
    pieces, step = [], None
    for i, s, start, end, at in fragments(zero, params):
        part = zero.single_partition_of_fp32_groups[i]
        state = zero.optimizer.state.get(part, {})
        if "step" in state:
            step = int(state["step"])
        if not s.writes_partition(topology):
            continue
        cut = slice(at, at + end - start)
        if part.dtype != s.param.dtype:
            pieces.append(Piece(f"master/{s.name}", s.global_shape, s.box, (start, end), part.detach()[cut]))
        for key in MOMENTS:
            if key in state:
                pieces.append(Piece(f"optim/{s.name}/{key}", s.global_shape, s.box, (start, end),
                                    state[key][cut]))
    return pieces, step


def read_zero_state(zero, ckpt: Checkpoint, params: list[Shard]) -> list:
    """Build this rank's master and moment partitions from the checkpoint; returns the
    closure that installs them (nothing is changed before it runs)."""
    step = ckpt.meta.get("adam_step")
    parts = zero.single_partition_of_fp32_groups
    masters = [part.detach().clone() for part in parts]
    moments = [{k: torch.zeros_like(part) for k in MOMENTS} for part in parts]
    cache: dict[str, tuple] = {}
    for i, s, start, end, at in fragments(zero, params):
        if s.name not in cache:
            cache[s.name] = (fetch_param(ckpt, s), fetch_moments(ckpt, s) if step is not None else {})
        weights, moms = cache[s.name]
        cut = slice(at, at + end - start)
        masters[i][cut] = weights.reshape(-1)[start:end]
        for key, values in moms.items():
            moments[i][key][cut] = values.reshape(-1)[start:end]

    def install() -> None:
        with torch.no_grad():
            for i, part in enumerate(parts):
                part.copy_(masters[i])
                if step is None:
                    zero.optimizer.state.pop(part, None)
                else:
                    zero.optimizer.state[part] = {"step": adam_step_count(step, zero.optimizer, part),
                                                  **moments[i]}

    return [install]

"""Adam's state in and out of checkpoints, for whichever stepper trains the model.

At zero_stage 0 every rank holds the full state of the parameter blocks it holds; the first
replica of each block writes it (checkpoint/layout.py), at the block's place in the global
tensor, so any layout reads it back. At stage 3 the same holds for each FSDP shard, whose
state is a DTensor sharded like it (checkpoint/layout.py). ZeRO's partitions (stages 1 and 2)
are checkpoint/zero.py. Adam's step count is one number for the whole model.
"""

from __future__ import annotations

import torch

from checkpoint.errors import CheckpointError
from checkpoint.layout import Piece, Shard, like_param, local_block
from checkpoint.reader import Checkpoint
from parallel.topology import Topology

MOMENTS = ("exp_avg", "exp_avg_sq")


def fetch_moments(ckpt: Checkpoint, shard: Shard) -> dict[str, torch.Tensor]:
    """Adam's two moments of a parameter's block, fp32."""
    out = {}
    for key in MOMENTS:
        values = ckpt.fetch(f"optim/{shard.name}/{key}", shard.box, torch.float32)
        if values is None:
            raise CheckpointError(f"checkpoint {ckpt.path} has optimizer steps but no "
                                  f"optim/{shard.name}/{key}")
        out[key] = values
    return out


def adam_step_count(step: int, optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """Adam's step count for `param`'s restored state, where torch's AdamW keeps it: on the
    parameter's device for the fused (CUDA) kernel, on the host for the per-tensor one."""
    fused = bool(optimizer.defaults.get("fused"))
    return torch.tensor(float(step), device=param.device if fused else "cpu")


def plain_pieces(optimizer: torch.optim.Optimizer, params: list[Shard],
                  topology: Topology) -> tuple[list[Piece], int | None]:
    """Adam's moments of the parameter blocks this rank writes (the first replica of each),
    and the step count (None before the first step). The state is keyed by the parameter
    (at stage 3 the DTensor, whose local block the shard holds)."""
    pieces, step = [], None
    for s in params:
        state = optimizer.state.get(s.param, {})
        if "step" in state:
            step = int(state["step"])
        if state and s.writes_whole(topology):
            pieces += [Piece(f"optim/{s.name}/{k}", s.global_shape, s.box, (0, s.box.numel),
                             local_block(state[k])) for k in MOMENTS]
    return pieces, step


def read_plain_state(optimizer: torch.optim.Optimizer, ckpt: Checkpoint, params: list[Shard]) -> list:
    step = ckpt.meta.get("adam_step")
    staged = [(s.param, fetch_moments(ckpt, s)) for s in params] if step is not None else []

    def install() -> None:
        optimizer.state.clear()
        for p, moments in staged:
            optimizer.state[p] = {"step": adam_step_count(step, optimizer, p)} | {
                k: like_param(p, v) for k, v in moments.items()}

    return [install]

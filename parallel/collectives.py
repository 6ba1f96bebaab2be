"""Collectives for MoE: a differentiable all-to-all on all_to_all_single, and the
expert-parallel communicator the MoE layer is injected with.

Only `all_to_all_single` is used: it supports uneven splits on gloo and NCCL, while the list
form `all_to_all` does not exist on gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Rows of `x` go to ranks by `input_splits`; rows arrive by `output_splits`.

    Backward is the same exchange with the splits swapped, so every rank runs the same
    collectives in backward even when it sent or received nothing (no deadlock).
    """

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Differentiable all-to-all of the rows of `x` with uneven splits."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


class ProcessGroupExpertComm:
    """model.moe.dispatch.ExpertComm over a torch.distributed expert-parallel group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def exchange_counts(self, send_counts_RE: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send_counts_RE)
        dist.all_to_all_single(recv, send_counts_RE.contiguous(), group=self.group)
        return recv

    def all_to_all(self, x, output_splits, input_splits):
        return all_to_all(x, output_splits, input_splits, self.group)

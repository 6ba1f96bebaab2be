"""Gradient reduction for data parallelism with experts, and the global gradient norm.

Why experts divide by dp and not by edp (the classic bug): the training loss is the mean of
the dp ranks' local losses, L = (1/dp) * sum_r loss_r. After backward an expert's gradient on
its owner already holds sum over the ep group's ranks of d loss_r / d w (the all-to-all's
backward brought every token's contribution home). Summing over the edp group adds the other
ep groups, which gives sum over all dp ranks; dividing by dp gives dL/dw. Dividing by edp
would scale expert gradients by ep relative to dense ones.

Tensor parallelism keeps the rule: the tp ranks of one dp column compute the same loss; dense
shards reduce within their own dp group; tp partners hold the same experts and sit in one edp
group (edp = world / ep), each having dispatched a disjoint slice of the tokens, so summing
over edp still counts every token of every dp rank exactly once.
"""

from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from parallel.collectives import all_reduce
from parallel.topology import Topology


def _all_reduce_sum_(tensors: list[torch.Tensor], group, scale: float) -> None:
    """Sum over the group, then multiply by scale; one flat buffer so gloo sends one message."""
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    all_reduce(flat, group)
    flat.mul_(scale)
    for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(reduced)


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:
            # Every parameter gets a gradient in this model (dropless, stacked experts); a
            # missing one would desynchronise the flat buffers across ranks.
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def reduce_gradients(
    dense: list[torch.nn.Parameter], expert: list[torch.nn.Parameter], topology: Topology
) -> None:
    """Dense grads: mean over dp. Expert grads: sum over edp, divided by dp (see module doc)."""
    dp = topology.size("dp")
    if dp > 1:
        _all_reduce_sum_(_grads(dense), topology.groups["dp"], 1.0 / dp)
    if topology.size("edp") > 1:
        _all_reduce_sum_(_grads(expert), topology.groups["edp"], 1.0 / dp)
    elif dp > 1:
        for g in _grads(expert):
            g.mul_(1.0 / dp)


def global_grad_norm(
    dense: list[torch.nn.Parameter], expert: list[torch.nn.Parameter], topology: Topology
) -> torch.Tensor:
    """L2 norm of the full model's gradient, the same value on every rank.

    After reduce_gradients every rank of a dp group holds the same grads. Each piece of the
    model is counted once: replicated dense params locally; tensor-parallel shards summed over
    the tp group; experts summed over the ep group (which lies inside one tp column, and tp
    partners hold replicas of the same experts).
    """
    device = (dense + expert)[0].device
    sharded = [p for p in dense if getattr(p, "tensor_model_parallel", False)]
    replicated = [p for p in dense if not getattr(p, "tensor_model_parallel", False)]

    def sq(params):
        # Multi-tensor norms (torch._foreach_norm on CUDA): one pass over the gradients with
        # no temporaries, where squaring each gradient and summing it takes three passes and
        # a gradient-sized temporary per tensor.
        grads = _grads(params)
        if not grads:
            return torch.zeros((), device=device)
        return get_total_norm(grads).float().square()

    sharded_sq, expert_sq = sq(sharded), sq(expert)
    if topology.size("tp") > 1:
        all_reduce(sharded_sq, topology.groups["tp"])
    if topology.size("ep") > 1:
        all_reduce(expert_sq, topology.groups["ep"])
    return (sq(replicated) + sharded_sq + expert_sq).sqrt()


def clip_gradients_(
    dense: list[torch.nn.Parameter],
    expert: list[torch.nn.Parameter],
    max_norm: float,
    topology: Topology,
) -> torch.Tensor:
    """Scale all gradients so the global norm is at most max_norm; returns the norm before."""
    norm = global_grad_norm(dense, expert, topology)
    if max_norm > 0:  # every gradient times min(1, max_norm / (norm + 1e-6)), multi-tensor
        clip_grads_with_norm_(dense + expert, max_norm, norm)
    return norm

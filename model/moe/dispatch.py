"""Dispatch and combine: move token-slots to the rank that owns their expert and back.

Shape legend: T tokens, K choices per token, N = T*K token-slots, D model dim,
E global experts, R expert-parallel ranks, El = E / R experts per rank.

The collectives arrive through an injected `ExpertComm` (parallel/ provides the process-group
one); this module never imports torch.distributed. `LocalComm` is the world of one.

Algorithm (native, dropless):
  1. permute: sort the N slots by global expert id; experts are laid out rank-major
     (rank r owns experts [r*El, (r+1)*El)), so the sort also groups slots by destination rank.
  2. count exchange: all-to-all of the (R, El) per-expert counts, so each rank learns how
     many rows it will receive from every source for each of its local experts.
  3. token exchange: all-to-all of the sorted rows with uneven splits.
  4. group: received rows arrive source-major (src0: e0 e1 .., src1: e0 e1 ..); reorder them
     expert-major so each local expert's rows are contiguous for the grouped GEMM.
  combine runs 4 -> 3 -> 1 in reverse and weights each slot by its router weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class ExpertComm(Protocol):
    """Collectives over the expert-parallel group, as the MoE layer needs them."""

    size: int
    rank: int

    def exchange_counts(self, send_counts_RE: torch.Tensor) -> torch.Tensor:
        """Row r goes to rank r; returns recv_counts_RE with row s from rank s. No grad."""
        ...

    def all_to_all(
        self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]
    ) -> torch.Tensor:
        """Differentiable all-to-all of rows with uneven splits; backward swaps the splits."""
        ...


class LocalComm:
    """A world of one expert-parallel rank: every exchange is the identity."""

    size = 1
    rank = 0

    def exchange_counts(self, send_counts_RE: torch.Tensor) -> torch.Tensor:
        return send_counts_RE

    def all_to_all(self, x, output_splits, input_splits):
        return x


@dataclass(frozen=True)
class DispatchPlan:
    """What combine needs to undo dispatch. Made per call, never stored on the layer."""

    sort_idx_N: torch.Tensor
    """Slot order sorted by global expert; slot n is (token n // K, choice n % K)."""
    input_splits: list[int]
    """Rows this rank sends to each expert-parallel rank."""
    output_splits: list[int]
    """Rows this rank receives from each expert-parallel rank."""
    group_idx: torch.Tensor | None
    """Received row order -> expert-major order (None at ep=1, where they are equal)."""
    tokens_per_expert: torch.Tensor
    """Rows per local expert after grouping, (El,) int64, on the device."""


def dispatch(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int, comm: ExpertComm
) -> tuple[torch.Tensor, DispatchPlan]:
    """Returns the rows for this rank's local experts, expert-major, and the plan to undo it."""
    K = topk_idx_TK.shape[1]
    # 1. permute by global expert (stable, so slots of one expert keep token order).
    expert_N = topk_idx_TK.reshape(-1)
    sort_idx_N = torch.argsort(expert_N, stable=True)
    x_sorted_ND = x_TD.index_select(0, sort_idx_N // K)
    counts_E = torch.bincount(expert_N, minlength=num_experts)
    if comm.size == 1:
        n = x_sorted_ND.shape[0]
        return x_sorted_ND, DispatchPlan(sort_idx_N, [n], [n], None, counts_E)

    # 2. count exchange.
    send_counts_RE = counts_E.view(comm.size, -1)
    recv_counts_RE = comm.exchange_counts(send_counts_RE)
    # Host synchronisation (the one per layer in forward): all_to_all needs splits as ints.
    splits = torch.cat([send_counts_RE.sum(1), recv_counts_RE.sum(1)]).tolist()
    input_splits, output_splits = splits[: comm.size], splits[comm.size :]

    # 3. token exchange.
    x_recv_ND = comm.all_to_all(x_sorted_ND, output_splits, input_splits)

    # 4. group received rows by local expert.
    num_local = recv_counts_RE.shape[1]
    local_expert_of_block = torch.arange(num_local, device=x_TD.device).repeat(comm.size)
    local_expert_N = torch.repeat_interleave(
        local_expert_of_block, recv_counts_RE.flatten(), output_size=sum(output_splits)
    )
    group_idx = torch.argsort(local_expert_N, stable=True)
    plan = DispatchPlan(
        sort_idx_N, input_splits, output_splits, group_idx, recv_counts_RE.sum(0)
    )
    return x_recv_ND.index_select(0, group_idx), plan


def combine(
    y_grouped_ND: torch.Tensor, topk_weight_TK: torch.Tensor, plan: DispatchPlan, comm: ExpertComm
) -> torch.Tensor:
    """Inverse of dispatch, then each token's weighted sum over its K expert outputs."""
    T, K = topk_weight_TK.shape
    y_recv_ND = y_grouped_ND
    if plan.group_idx is not None:
        # 4^-1: expert-major back to the received (source-major) order.
        y_recv_ND = torch.zeros_like(y_grouped_ND).index_copy(0, plan.group_idx, y_grouped_ND)
        # 3^-1: rows go back to the ranks they came from.
        y_recv_ND = comm.all_to_all(y_recv_ND, plan.input_splits, plan.output_splits)
    # 1^-1: un-permute to slot order, weight, sum over the K choices.
    y_slots_ND = torch.zeros_like(y_recv_ND).index_copy(0, plan.sort_idx_N, y_recv_ND)
    y_TKD = y_slots_ND.view(T, K, -1)
    # Weighted sum in fp32 (the router weights are fp32), result in the activations' dtype.
    return (y_TKD.float() * topk_weight_TK.unsqueeze(-1)).sum(dim=1).to(y_grouped_ND.dtype)

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

import functools
from dataclasses import dataclass
from typing import Protocol

import torch

from model.moe.router import count_per_expert


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


def inverse_permutation(perm_N: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[n]] = n: one scatter, where a second argsort would sort again."""
    arange_N = torch.arange(perm_N.numel(), device=perm_N.device)
    return torch.empty_like(perm_N).scatter_(0, perm_N, arange_N)


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation: forward and backward are both gathers.

    Autograd's index_select backward is a memset plus index_add_, whose CUDA kernel adds with
    atomics (order-dependent floats). Gathering the gradient with the inverse permutation
    needs neither, and is exact.
    """

    @staticmethod
    def forward(ctx, x, perm, inv_perm):
        ctx.save_for_backward(inv_perm)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inv_perm,) = ctx.saved_tensors
        return grad.index_select(0, inv_perm), None, None


def _sum_slot_grads(grad_ND: torch.Tensor, inv_sort_N: torch.Tensor, K: int) -> torch.Tensor:
    """Each token's gradient: the sum of its K slot rows, gathered from expert order."""
    return grad_ND.index_select(0, inv_sort_N).view(-1, K, grad_ND.shape[-1]).sum(dim=1)


def _unpermute_weighted_sum(y_ND: torch.Tensor, w_TK: torch.Tensor, inv_sort_N: torch.Tensor):
    """The fused combine's forward: gather each token's K rows, weight (fp32) and sum."""
    T, K = w_TK.shape
    y_TKD = y_ND.index_select(0, inv_sort_N).view(T, K, -1)
    return (y_TKD * w_TK.unsqueeze(-1)).sum(dim=1).to(y_ND.dtype)


def _combine_row_grads(grad_TD: torch.Tensor, w_TK: torch.Tensor, sort_idx_N: torch.Tensor):
    """Row n's gradient, in expert order: its token's output gradient times its weight."""
    K = w_TK.shape[1]
    w_N1 = w_TK.reshape(-1).index_select(0, sort_idx_N).to(grad_TD.dtype).unsqueeze(-1)
    return grad_TD.index_select(0, sort_idx_N // K) * w_N1


def _combine_weight_grads(grad_TD: torch.Tensor, y_ND: torch.Tensor, inv_sort_N: torch.Tensor):
    """Weight (t, k)'s gradient: the dot product of the token's output gradient and its row."""
    T = grad_TD.shape[0]
    y_TKD = y_ND.index_select(0, inv_sort_N).view(T, -1, y_ND.shape[-1])
    return torch.sum(grad_TD.unsqueeze(1) * y_TKD, dim=-1, dtype=torch.float32)


@functools.cache
def compiled(fn):
    """fn through torch.compile, once per process, with dynamic shapes (row counts change with
    the routing): the MoE layer's fused kernels (NativeMoE.compile_kernels)."""
    return torch.compile(fn, dynamic=True)


class _ExpandToSortedSlots(torch.autograd.Function):
    """x_TD -> its K slot rows in expert order: row n is token sort_idx[n] // K.

    Backward gathers the gradient back to slot order with the inverse permutation and sums each
    token's K rows (in fp32 inside the reduction, one rounding), instead of index_add_'s K
    atomic additions per token into the activations' dtype. `fused`: gather and sum as one
    compiled kernel, without the (N, D) gathered copy.
    """

    @staticmethod
    def forward(ctx, x_TD, sort_idx_N, inv_sort_N, K: int, fused: bool = False):
        ctx.save_for_backward(inv_sort_N)
        ctx.K, ctx.fused = K, fused
        return x_TD.index_select(0, sort_idx_N // K)

    @staticmethod
    def backward(ctx, grad_ND):
        (inv_sort_N,) = ctx.saved_tensors
        sum_slots = compiled(_sum_slot_grads) if ctx.fused else _sum_slot_grads
        return sum_slots(grad_ND.contiguous(), inv_sort_N, ctx.K), None, None, None, None


@dataclass(frozen=True)
class DispatchPlan:
    """What combine needs to undo dispatch. Made per call, never stored on the layer."""

    sort_idx_N: torch.Tensor
    """Slot order sorted by global expert; slot n is (token n // K, choice n % K)."""
    inv_sort_idx_N: torch.Tensor
    """Its inverse: where each slot went."""
    input_splits: list[int]
    """Rows this rank sends to each expert-parallel rank."""
    output_splits: list[int]
    """Rows this rank receives from each expert-parallel rank."""
    group_idx: torch.Tensor | None
    """Received row order -> expert-major order (None at ep=1, where they are equal)."""
    inv_group_idx: torch.Tensor | None
    """Its inverse."""
    tokens_per_expert: torch.Tensor
    """Rows per local expert after grouping, (El,) int64, on the device."""


def dispatch(
    x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int, comm: ExpertComm,
    counts_E: torch.Tensor | None = None, fused: bool = False,
) -> tuple[torch.Tensor, DispatchPlan]:
    """Returns the rows for this rank's local experts, expert-major, and the plan to undo it.
    `counts_E`: the slots per global expert of `topk_idx_TK` when the caller has them already
    (the router counted them), else they are counted here. `fused`: the backward's gather and
    sum as one compiled kernel.

    Host synchronisations: none at ep=1; at ep>1 exactly one, the split sizes.
    """
    K = topk_idx_TK.shape[1]
    # 1. permute by global expert (stable, so slots of one expert keep token order).
    expert_N = topk_idx_TK.reshape(-1)
    sort_idx_N = torch.argsort(expert_N, stable=True)
    inv_sort_N = inverse_permutation(sort_idx_N)
    x_sorted_ND = _ExpandToSortedSlots.apply(x_TD, sort_idx_N, inv_sort_N, K, fused)
    if counts_E is None:
        counts_E = count_per_expert(expert_N, num_experts)
    if comm.size == 1:
        n = x_sorted_ND.shape[0]
        return x_sorted_ND, DispatchPlan(sort_idx_N, inv_sort_N, [n], [n], None, None, counts_E)

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
    inv_group_idx = inverse_permutation(group_idx)
    plan = DispatchPlan(sort_idx_N, inv_sort_N, input_splits, output_splits, group_idx,
                        inv_group_idx, recv_counts_RE.sum(0))
    return _PermuteRows.apply(x_recv_ND, group_idx, inv_group_idx), plan


def combine(
    y_grouped_ND: torch.Tensor, topk_weight_TK: torch.Tensor, plan: DispatchPlan, comm: ExpertComm,
    fused: bool = False,
) -> torch.Tensor:
    """Inverse of dispatch, then each token's weighted sum over its K expert outputs. `fused`:
    the un-permute, weighting and sum as compiled kernels (_FusedCombine)."""
    T, K = topk_weight_TK.shape
    y_recv_ND = y_grouped_ND
    if plan.group_idx is not None:
        # 4^-1: expert-major back to the received (source-major) order.
        y_recv_ND = _PermuteRows.apply(y_grouped_ND, plan.inv_group_idx, plan.group_idx)
        # 3^-1: rows go back to the ranks they came from.
        y_recv_ND = comm.all_to_all(y_recv_ND, plan.input_splits, plan.output_splits)
    if fused:
        return _FusedCombine.apply(y_recv_ND, topk_weight_TK, plan.sort_idx_N, plan.inv_sort_idx_N)
    # 1^-1: un-permute to slot order.
    y_TKD = _PermuteRows.apply(y_recv_ND, plan.inv_sort_idx_N, plan.sort_idx_N).view(T, K, -1)
    return _WeightedSumOfChoices.apply(y_TKD, topk_weight_TK)


class _WeightedSumOfChoices(torch.autograd.Function):
    """y_TD = sum_k w_TK[:, k] * y_TKD[:, k]: each token's K expert outputs, weighted.

    As elementwise passes and a reduction over D, which run at memory speed, where one batched
    (1, K) x (K, D) product per token runs far below it (benchmarks/results/h100-2026-11-23).
    Keeps for backward only what the bmm kept: the rows, in the activations' dtype, and the
    weights.

    Rounding: the forward multiplies by the fp32 weights and sums in fp32, then rounds once to
    the rows' dtype. Backward's row gradient uses the weights rounded to that dtype (as
    DeepSpeed's combine einsum does); the weight gradient sums its D products in fp32.
    """

    @staticmethod
    def forward(ctx, y_TKD, w_TK):
        ctx.save_for_backward(y_TKD, w_TK)
        # One pass per choice into an fp32 sum (T, D): as fast as the bmm on CPU, where a
        # multiply-then-sum over the middle axis took three times as long.
        out_TD = y_TKD[:, 0] * w_TK[:, :1]
        for k in range(1, y_TKD.shape[1]):
            out_TD.addcmul_(y_TKD[:, k], w_TK[:, k : k + 1])
        return out_TD.to(y_TKD.dtype)

    @staticmethod
    def backward(ctx, grad_TD):
        y_TKD, w_TK = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad
        grad_T1D = grad_TD.to(y_TKD.dtype).unsqueeze(1)
        dy = grad_T1D * w_TK.to(y_TKD.dtype).unsqueeze(-1) if need_y else None
        dw = torch.sum(grad_T1D * y_TKD, dim=-1, dtype=torch.float32).to(w_TK.dtype) if need_w else None
        return dy, dw


class _FusedCombine(torch.autograd.Function):
    """Un-permute, weight and sum in one compiled kernel, and its backward in two.

    The eager combine writes the un-permuted (N, D) rows and reads them again to weight them;
    backward writes the (N, D) row gradients in slot order and gathers them back to expert
    order. Here the forward reads each row once and writes (T, D); backward writes the row
    gradients straight in expert order, and the weights' gradient reads the rows once.
    Keeps the rows in expert order for backward (the eager path keeps them un-permuted: the same
    bytes). The same arithmetic as _WeightedSumOfChoices (fp32 weights and sum forward, weights
    rounded to the rows' dtype for the row gradients, fp32 sums for theirs).
    """

    @staticmethod
    def forward(ctx, y_ND, w_TK, sort_idx_N, inv_sort_N):
        ctx.save_for_backward(y_ND, w_TK, sort_idx_N, inv_sort_N)
        return compiled(_unpermute_weighted_sum)(y_ND, w_TK, inv_sort_N)

    @staticmethod
    def backward(ctx, grad_TD):
        y_ND, w_TK, sort_idx_N, inv_sort_N = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[:2]
        grad_TD = grad_TD.to(y_ND.dtype).contiguous()
        dy = compiled(_combine_row_grads)(grad_TD, w_TK, sort_idx_N) if need_y else None
        dw = (compiled(_combine_weight_grads)(grad_TD, y_ND, inv_sort_N).to(w_TK.dtype)
              if need_w else None)
        return dy, dw, None, None

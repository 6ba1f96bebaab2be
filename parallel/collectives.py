"""The project's collectives: every one of them goes through this module, so a collective
that cannot complete fails with an error that names its process group.

- Named collectives: `all_reduce`, `all_gather_cat`, `all_to_all_single`, `all_gather_object`,
  `broadcast_object`, `barrier`. A failure inside them (a peer that died closes the
  connection; a peer that stalls makes the op time out after parallel.timeout_s, which every
  group gets, see parallel.topology) is re-raised as CollectiveError naming the op, the group
  (its name and global ranks), this rank and the seconds waited. DeepSpeed's ZeRO collectives
  run on our groups; `named_region` labels them the same way.
- MoE: a differentiable all-to-all on all_to_all_single, and the expert-parallel communicator
  the MoE layer is injected with. Only `all_to_all_single` is used: it supports uneven splits
  on gloo and NCCL, while the list form `all_to_all` does not exist on gloo.
- `count_collectives()`: an opt-in record of every collective above on this rank (op, group,
  bytes), which the planner's tests hold against its figures (planner/comms.py). Off, a
  collective pays one test of a module variable; DeepSpeed's and MegaBlocks' own collectives
  do not pass here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective that could not complete on this rank: a peer died or stalled."""


# What a failed collective looks like when the error surfaces in a larger region of code
# (gloo's transport errors; NCCL's come as DistBackendError).
_COMM_FAILURE = re.compile(
    r"Timed out waiting|Connection closed by peer|Connection reset by peer|pair closure|"
    r"Broken pipe|NCCL|timed out|Socket Timeout", re.IGNORECASE)


@dataclass(frozen=True)
class CollectiveCall:
    """One collective this rank took part in, as count_collectives records it."""

    op: str
    """all_reduce, all_gather, all_to_all, all_gather_object, broadcast_object or barrier."""
    group: str
    """The group's name (Topology's: dp, tp, ep, edp), or world."""
    nbytes: int
    """This rank's input: the tensor reduced, its piece of a gather, every row it sends (its
    own included); 0 for objects (their pickled size is not known here) and barriers."""
    sent: tuple[int, ...] = ()
    """all_to_all: bytes to each rank of the group, in group-rank order."""
    ranks: tuple[int, ...] = ()
    """all_to_all: the group's global ranks, in group-rank order."""


_calls: list[CollectiveCall] | None = None  # set only inside count_collectives()


@contextmanager
def count_collectives() -> Iterator[list[CollectiveCall]]:
    """Record every collective of this module on this rank, in order, into the list yielded."""
    global _calls
    outer, _calls = _calls, []
    try:
        yield _calls
    finally:
        _calls = outer


def _group_name(group: dist.ProcessGroup | None) -> str:
    if group is None or group is dist.group.WORLD:
        return "world"
    return getattr(group, "group_desc", "") or f"group {group.group_name}"


def _record(op: str, group, x: torch.Tensor | None = None, input_splits: list[int] | None = None) -> None:
    nbytes = 0 if x is None else x.numel() * x.element_size()
    sent: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()
    if op == "all_to_all":
        ranks = tuple(dist.get_process_group_ranks(group))
        row = nbytes // max(x.shape[0], 1)
        splits = input_splits or [x.shape[0] // len(ranks)] * len(ranks)
        sent = tuple(n * row for n in splits)
    _calls.append(CollectiveCall(op, _group_name(group), nbytes, sent, ranks))


def group_label(group: dist.ProcessGroup | None) -> str:
    """'ep (global ranks [0, 2])': the name Topology gave the group and its members."""
    if group is None or group is dist.group.WORLD:
        return f"world (global ranks 0..{dist.get_world_size() - 1})"
    name = getattr(group, "group_desc", "") or f"group {group.group_name}"
    return f"{name} (global ranks {dist.get_process_group_ranks(group)})"


@contextmanager
def named_region(what: str, group: dist.ProcessGroup | None, only_comm_errors: bool = False) -> Iterator[None]:
    """Re-raise a failure of the collectives inside as CollectiveError naming `group`.

    `only_comm_errors` is for regions that also compute (DeepSpeed's step): there only errors
    that look like a communication failure are renamed, so an out-of-memory stays itself."""
    start = time.monotonic()
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as exc:
        is_comm = isinstance(exc, dist.DistError) or bool(_COMM_FAILURE.search(str(exc)))
        if only_comm_errors and not is_comm:
            raise
        why = ("A peer of this group died or stopped answering (a stalled peer fails the op "
               "after parallel.timeout_s); its own log says why" if is_comm else
               "Not a transport failure: the op's arguments (sizes, dtypes, devices) on this "
               "rank are the first suspect")
        raise CollectiveError(
            f"{what} on process group {group_label(group)} failed on global rank "
            f"{dist.get_rank()} after {time.monotonic() - start:.1f} s: {exc}. {why}") from exc


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None = None,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
    """In-place all-reduce of `x` over `group` (the world when None)."""
    if _calls is not None:
        _record("all_reduce", group, x)
    with named_region("all_reduce", group):
        dist.all_reduce(x, op=op, group=group)


def all_gather_cat(x: torch.Tensor, group: dist.ProcessGroup, size: int, dim: int = 0) -> torch.Tensor:
    """Every rank's `x`, concatenated along `dim` in group-rank order."""
    parts = [torch.empty_like(x) for _ in range(size)]
    if _calls is not None:
        _record("all_gather", group, x)
    with named_region("all_gather", group):
        dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def all_to_all_single(out: torch.Tensor, x: torch.Tensor, output_splits: list[int] | None,
                      input_splits: list[int] | None, group: dist.ProcessGroup) -> None:
    if _calls is not None:
        _record("all_to_all", group, x, input_splits)
    with named_region("all_to_all", group):
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's picklable `obj`, in rank order."""
    out: list = [None] * dist.get_world_size(group)
    if _calls is not None:
        _record("all_gather_object", group)
    with named_region("all_gather_object", group):
        dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj`, on every rank of the world."""
    box = [obj]
    if _calls is not None:
        _record("broadcast_object", None)
    with named_region("broadcast_object_list", None):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if _calls is not None:
        _record("barrier", group)
    with named_region("barrier", group):
        dist.barrier(group=group)


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
    all_to_all_single(out, x.contiguous(), output_splits, input_splits, group)
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
        all_to_all_single(recv, send_counts_RE.contiguous(), None, None, self.group)
        return recv

    def all_to_all(self, x, output_splits, input_splits):
        return all_to_all(x, output_splits, input_splits, self.group)

"""Every collective a rank runs, counted at torch.distributed's own level (its c10d operators).

parallel/collectives.count_collectives sees the project's collectives; DeepSpeed's ZeRO (and
FSDP2) call torch.distributed directly. All of them reach the dispatcher as c10d operators
(c10d.allreduce_, c10d.alltoall_base_, ...), so a dispatch mode sees each one, whoever calls
it, with its process group. Used by tests/distributed/test_planner.py only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.collectives import CollectiveCall

# c10d operator -> (our op name, index of the argument whose bytes are this rank's input)
_OPS = {"allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
        "_allgather_base_": ("all_gather", 1), "allgather_": ("all_gather", 1),
        "allgather_into_tensor_coalesced_": ("all_gather", 1),
        "reduce_scatter_": ("reduce_scatter", 1), "_reduce_scatter_base_": ("reduce_scatter", 1),
        "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
        "alltoall_base_": ("all_to_all", 1), "reduce_": ("reduce", 0), "broadcast_": ("broadcast", 0),
        "barrier": ("barrier", None)}


def _nbytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_nbytes(a) for a in arg)
    return 0


class DistCounter(TorchDispatchMode):
    """While active, appends a CollectiveCall per c10d operator this thread dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[CollectiveCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.calls.append(self._call(func._opname, args))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _call(name: str, args) -> CollectiveCall:
        if name not in _OPS:
            raise AssertionError(f"a c10d operator the counter does not know: {name}")
        op, arg = _OPS[name]
        pg = dist.ProcessGroup.unbox(next(a for a in args if isinstance(a, torch.ScriptObject)))
        group = "world" if pg.group_desc == "default_pg" else pg.group_desc
        if op == "barrier":
            return CollectiveCall("barrier", group, 0)
        nbytes = _nbytes(args[arg])
        if op != "all_to_all":
            return CollectiveCall(op, group, nbytes)
        x, splits = args[1], args[4]
        ranks = tuple(dist.get_process_group_ranks(pg))
        row = nbytes // max(x.shape[0], 1)
        splits = list(splits) or [x.shape[0] // len(ranks)] * len(ranks)
        return CollectiveCall(op, group, nbytes, tuple(n * row for n in splits), ranks)

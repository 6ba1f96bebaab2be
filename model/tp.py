"""The tensor-parallel seam: five operations the layers call, injected from outside.

The model calls them at the edges of its tensor-parallel regions and never imports
torch.distributed; `LocalTP` (tp = 1) makes every one the identity. parallel/tensor_parallel.py
provides the process-group version and shards the weights.

    enter(x):  forward identity,           backward all-reduce   (into a column-parallel matmul)
    exit(x):   forward all-reduce,         backward identity     (out of a row-parallel matmul)
    split(x):  forward keep my dim-0 slice, backward all-gather  (replicated -> token slice)
    gather(x): forward all-gather dim 0,   backward keep my slice (token slice -> replicated)
    all_reduce(x): forward all-reduce,     backward all-reduce   (a sum every rank feeds from its
               own slice and uses for its own slice: the mean of squares of a tp-split q)
"""

from __future__ import annotations

from typing import Protocol

import torch


class TensorParallelComm(Protocol):
    size: int
    rank: int

    def enter(self, x: torch.Tensor) -> torch.Tensor: ...

    def exit(self, x: torch.Tensor) -> torch.Tensor: ...

    def split(self, x: torch.Tensor) -> torch.Tensor: ...

    def gather(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...


class LocalTP:
    """tp = 1: every region edge is the identity."""

    size = 1
    rank = 0

    def enter(self, x):
        return x

    def exit(self, x):
        return x

    def split(self, x):
        return x

    def gather(self, x):
        return x

    def all_reduce(self, x):
        return x

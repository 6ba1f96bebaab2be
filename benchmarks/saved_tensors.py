"""Activation memory as autograd sees it: the bytes a forward saves for its backward.

Peak CUDA memory is the figure that matters on a GPU, and the layer benchmark reports it there.
The bytes saved for backward are the part of it a layer's design controls, and they are exact
on any device: count every tensor autograd packs during the forward, once per storage, leaving
out parameters (they are held anyway). Tests hold the native MoE layer to a budget with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """Runs `fn()` and returns (bytes saved for backward, fn's result).

    Views of one storage count once (the largest extent seen); tensors sharing storage with
    `exclude` (pass the parameters; a DTensor's local shard is what it holds) do not count,
    and neither do parameters or their views: FSDP2's gathered parameters (stage 3) are
    parameters too, whose storage it frees after forward and gathers again for backward.
    """
    excluded = {(t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()
                for t in exclude}
    extent: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t if t._base is None else t._base, torch.nn.Parameter):
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in excluded:
            extent[key] = max(extent.get(key, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(extent.values()), result


class _Allocations(TorchDispatchMode):
    """Every storage an operation returns while active, as weak references (they do not keep it)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[StorageWeakRef, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.refs.append((StorageWeakRef(storage), storage.nbytes()))
        return out


def held_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """Runs `fn()` and returns (bytes still held once it returned, fn's result).

    Counts each storage made by an operation inside `fn` that is alive afterwards, once:
    what autograd saved, what it keeps by other means (a checkpointed region's inputs,
    tensors kept on an autograd context) and fn's result, but not storages that existed
    before (pass the parameters in `exclude`, whose views count as theirs). saved_tensor_bytes
    cannot see through activation checkpointing, whose hooks pack in its place; this can.
    It counts storage bytes at the size an operation returned them (not an allocator's rounded
    blocks); an in-place operation on a tensor made before the call counts that storage as made
    inside it, unless it is in `exclude`. Any device, meta included; eager operations only.
    """
    existing = {StorageWeakRef(t.untyped_storage()).cdata for t in exclude}
    mode = _Allocations()
    with mode:
        result = fn()
    alive = {ref.cdata: nbytes for ref, nbytes in mode.refs
             if not ref.expired() and ref.cdata not in existing}
    return sum(alive.values()), result

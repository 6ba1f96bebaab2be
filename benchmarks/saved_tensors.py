"""Activation memory as autograd sees it: the bytes a forward saves for its backward.

Peak CUDA memory is the figure that matters on a GPU, and the layer benchmark reports it there.
The bytes saved for backward are the part of it a layer's design controls, and they are exact
on any device: count every tensor autograd packs during the forward, once per storage, leaving
out parameters (they are held anyway). Tests hold the native MoE layer to a budget with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """Runs `fn()` and returns (bytes saved for backward, fn's result).

    Views of one storage count once (the largest extent seen); tensors sharing storage with
    `exclude` (pass the parameters) do not count.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    extent: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in excluded:
            extent[key] = max(extent.get(key, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(extent.values()), result

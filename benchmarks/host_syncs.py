"""Count the operations that make the host wait for a CUDA device, on any device.

CUDA's own sync debug mode (`torch.cuda.set_sync_debug_mode`) sees the real synchronisations,
but only on a GPU. This counter watches the aten operations under a TorchDispatchMode and
counts those that synchronise when their tensors live on a CUDA device, so the "at most one
host synchronisation per MoE layer in forward" rule can be checked on CPU, in CI. The layer
benchmark reports both counts on a GPU; they should agree.

What synchronises (each because the host needs a value computed on the device):
  - `_local_scalar_dense`: `.item()`, `.tolist()`, `bool(t)`, `int(t)`;
  - `nonzero` and everything built on it: `masked_select`, `argwhere`, indexing or
    `index_put_` with a boolean mask;
  - `bincount`: its output size depends on the largest input value;
  - `repeat_interleave` without `output_size`, `unique` in all its forms: output size again;
  - `equal`, `is_nonzero`: a host bool;
  - a copy from a CUDA tensor to the CPU, and `.tolist()` / `.numpy()` (on a CPU tensor these
    read memory without any aten operation, so they are caught one level up, as torch
    functions).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_ALWAYS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.argwhere.default,
    aten.bincount.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _device_to_host(func, args, out) -> bool:
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
    else:
        src, dst = args[0], out
    return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)
            and src.device.type == "cuda" and dst.device.type == "cpu")


def synchronises(func, args, kwargs, out) -> bool:
    """Whether `func(*args, **kwargs) -> out` makes the host wait when its inputs are on CUDA."""
    if func in _ALWAYS:
        return True
    if func in _REPEAT_INTERLEAVE:
        return kwargs.get("output_size") is None
    if func in _INDEXING:
        return _bool_index(args)
    if func in _COPIES:
        return _device_to_host(func, args, out)
    return False


class _HostReads(TorchFunctionMode):
    """`.tolist()` and `.numpy()`: the host reads a tensor's values."""

    def __init__(self, ops: Counter):
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.ops[func.__name__] += 1
            with torch._C.DisableTorchFunction():
                # Read without dispatching, so the same read is not counted again below.
                with torch.utils._python_dispatch._disable_current_modes():
                    return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as c: ...` then `c.count` and `c.ops` (op name -> count)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self._reads = _HostReads(self.ops)

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __enter__(self):
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if synchronises(func, args, kwargs, out):
            self.ops[str(func.overloadpacket.__name__)] += 1
        return out

"""Reference CPU implementation of `megablocks_ops`, MegaBlocks 0.10.0's CUDA extension
(csrc/ops.cu): the same functions, arguments, output dtypes and checks, in plain torch.

Only for tests/megablocks_reference (see its __init__): on a GPU the compiled extension from
scripts/install_megablocks.sh is imported instead. `indices` (block-sparse topology, used by
the `sparse` MLP only) is not provided; the backend uses the `grouped` MLP.
"""

import torch

_INTS = (torch.int16, torch.int32, torch.int64)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise RuntimeError(f"megablocks_ops (reference): {what}")


def sort(x: torch.Tensor, end_bit: int, x_out: torch.Tensor, iota_out: torch.Tensor) -> None:
    """cub::DeviceRadixSort::SortPairs of (x, 0..n-1) on key bits [0, end_bit): stable."""
    _check(x.dim() == 1 and x.dtype in _INTS, f"sort takes a 1-d integer tensor, got {x.dtype} {tuple(x.shape)}")
    for name, out in (("x_out", x_out), ("iota_out", iota_out)):
        _check(out.dim() == 1 and out.dtype == x.dtype, f"sort's {name} must be 1-d {x.dtype}, got {out.dtype} {tuple(out.shape)}")
    key = x & ((1 << end_bit) - 1) if end_bit < torch.iinfo(x.dtype).bits else x
    order = torch.sort(key, stable=True).indices
    x_out.copy_(x[order])
    iota_out.copy_(order)


def histogram(x: torch.Tensor, num_bins: int) -> torch.Tensor:
    """cub::DeviceHistogram::HistogramEven over [0, num_bins), one bin per integer; int32
    counts; a 1-d input gives a 1-d output, a 2-d input one histogram per row."""
    _check(x.dim() in (1, 2) and x.dtype in _INTS, f"histogram takes a 1-d or 2-d integer tensor, got {x.dtype} {tuple(x.shape)}")
    rows = x.view(1, -1) if x.dim() == 1 else x
    inside = (rows >= 0) & (rows < num_bins)  # CUB drops samples outside the levels
    out = torch.zeros(rows.shape[0], num_bins, dtype=torch.int32, device=x.device)
    out.scatter_add_(1, rows.clamp(0, num_bins - 1).long(), inside.to(torch.int32))
    return out.flatten() if x.dim() == 1 else out


def _cumsum_checks(x: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    _check(x.dim() == 2 and out.dim() == 2 and dim == 1, f"cumsum takes 2-d tensors along dim 1, got {tuple(x.shape)} dim {dim}")
    _check(x.dtype in _INTS and out.dtype == x.dtype, f"cumsum takes integers and an output of their dtype, got {x.dtype} -> {out.dtype}")


def inclusive_cumsum(x: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    _cumsum_checks(x, dim, out)
    out.copy_(x.cumsum(dim))


def exclusive_cumsum(x: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    _cumsum_checks(x, dim, out)
    out.copy_(x.cumsum(dim) - x)


def _bin_sizes(bins: torch.Tensor) -> torch.Tensor:
    _check(bins.dim() == 1 and bins.dtype == torch.int32, f"bins must be 1-d int32, got {bins.dtype} {tuple(bins.shape)}")
    return torch.diff(bins, prepend=bins.new_zeros(1)).long()


def replicate_forward(x: torch.Tensor, bins: torch.Tensor, out: torch.Tensor) -> None:
    """out[b, bins[i-1]:bins[i]] = x[b, i] (bins: inclusive cumsum of the bin sizes)."""
    sizes = _bin_sizes(bins)
    _check(x.dim() == 2 and out.dim() == 2 and x.shape[0] == out.shape[0] and x.shape[1] == bins.numel(),
           f"replicate_forward shapes x {tuple(x.shape)} bins {tuple(bins.shape)} out {tuple(out.shape)}")
    _check(x.dtype in (torch.float16, torch.int16, torch.int32) and out.dtype == x.dtype,
           f"replicate_forward takes float16, int16 or int32 and an output alike, got {x.dtype} -> {out.dtype}")
    _check(int(bins[-1]) <= out.shape[1], f"bins end at {int(bins[-1])} > {out.shape[1]} columns")
    out[:, : int(bins[-1])] = torch.repeat_interleave(x, sizes, dim=1)


def replicate_backward(grad: torch.Tensor, bins: torch.Tensor, out: torch.Tensor) -> None:
    """out[b, i] = sum of grad[b, bins[i-1]:bins[i]] (the segmented sum)."""
    sizes = _bin_sizes(bins)
    _check(grad.dim() == 2 and out.dim() == 2 and grad.shape[0] == out.shape[0] and out.shape[1] == bins.numel(),
           f"replicate_backward shapes grad {tuple(grad.shape)} bins {tuple(bins.shape)} out {tuple(out.shape)}")
    _check(grad.dtype == torch.float16 and out.dtype == torch.float16,
           f"replicate_backward takes float16 only, got {grad.dtype} -> {out.dtype}")
    segment = torch.repeat_interleave(torch.arange(bins.numel(), device=grad.device), sizes)
    out.zero_().index_add_(1, segment, grad[:, : int(bins[-1])])

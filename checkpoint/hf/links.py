"""How one of our tensors is made of HuggingFace tensors, and back: the links of a name table.

A link fills one of our global tensors from the HF tensors it names, or any block of it (a
`Box`: per-dim offsets and sizes, as a rank holds it under tp or ep) reading only the slices of
those HF tensors that the block needs, and writes its part of each of those HF tensors back
from our tensor. Every link only copies, transposes or permutes, so a round trip is bitwise.

    Direct     ours = hf                         (rows permuted within each head with `rope`)
    PerExpert  ours[e] = hf(e).T                  (one HF matrix per expert: gate_proj, w1, ...)
    FusedPart  ours[e] = hf[e, r0 : r0 + B].T     (transformers' fused gate_up_proj / down_proj)

Rotary convention. transformers rotates the two halves of each head (feature i with feature
i + Dh/2); model.layers.apply_rotary rotates interleaved pairs (2i with 2i + 1), the same
frequency i. So our row 2i of a head is HF's row i and our row 2i + 1 is HF's row i + Dh/2, in
q and k (weights, biases, QK-norm gains): queries and keys are relabelled alike, which no dot
product sees, and values are untouched. The permutation lives here, not as a second rotary
code path in the model.

Shape legend: E experts, A and B our last two dims (D and F, or F and D), Dh head dim.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch


class TensorSource(Protocol):
    """Read access to a set of HF tensors. `read` takes one slice per dim (contiguous ranges),
    as safetensors' `safe_open(...).get_slice(name)[slices]` does."""

    def names(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor: ...


class DictSource:
    """A TensorSource over an in-memory state dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> Iterable[str]:
        return self.tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.tensors[name][index]


def _ranges(box, shape) -> list[tuple[int, int]]:
    """[start, stop) per dim of `box` (anything with .offsets and .sizes; None = the whole)."""
    if box is None:
        return [(0, n) for n in shape]
    return [(o, o + s) for o, s in zip(box.offsets, box.sizes)]


def _slices(ranges) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in ranges)


def rope_rows(rows: int, head_dim: int) -> torch.Tensor:
    """perm with ours[j] = hf[perm[j]] for `rows` = heads x head_dim rows (see the module doc)."""
    half = torch.arange(head_dim // 2)
    in_head = torch.stack((half, half + head_dim // 2), dim=1).flatten()  # 0, Dh/2, 1, Dh/2+1 ...
    return (torch.arange(rows) // head_dim * head_dim + in_head.repeat(rows // head_dim))


class Link:
    """Our tensor `ours` of global shape `shape`, made of the HF tensors of `hf_shapes`."""

    ours: str
    shape: tuple[int, ...]
    hf_shapes: dict[str, tuple[int, ...]]

    def read(self, source: TensorSource, box=None) -> torch.Tensor:
        """Our block `box` (None: the whole tensor), reading only the HF slices it needs."""
        raise NotImplementedError

    def write(self, hf_name: str, ours: torch.Tensor, out: torch.Tensor) -> None:
        """Write this link's part of HF tensor `hf_name` into `out` from our whole tensor.
        Each of its HF tensors holds an equal share of ours (table.build_table checks that
        the parts of every HF tensor fill it)."""
        raise NotImplementedError


class Direct(Link):
    def __init__(self, ours: str, hf: str, shape, rope_head_dim: int | None = None):
        self.ours, self.hf, self.shape = ours, hf, tuple(shape)
        self.hf_shapes = {hf: self.shape}
        self.perm = None if rope_head_dim is None else rope_rows(self.shape[0], rope_head_dim)

    def read(self, source, box=None):
        ranges = _ranges(box, self.shape)
        if self.perm is None:
            return source.read(self.hf, _slices(ranges))
        rows = self.perm[ranges[0][0] : ranges[0][1]]  # within heads: a short contiguous span
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return source.read(self.hf, _slices([(lo, hi), *ranges[1:]]))[rows - lo]

    def write(self, hf_name, ours, out):
        if self.perm is None:
            out.copy_(ours)
        else:
            out[self.perm] = ours


class PerExpert(Link):
    def __init__(self, ours: str, hf_template: str, shape):
        self.ours, self.shape = ours, tuple(shape)
        E, A, B = self.shape
        self.names = [hf_template.format(e=e) for e in range(E)]
        self.hf_shapes = {name: (B, A) for name in self.names}
        self.expert = {name: e for e, name in enumerate(self.names)}

    def read(self, source, box=None):
        (e0, e1), a, b = _ranges(box, self.shape)
        return torch.stack([source.read(self.names[e], _slices([b, a])).T for e in range(e0, e1)])

    def write(self, hf_name, ours, out):
        out.copy_(ours[self.expert[hf_name]].T)


class FusedPart(Link):
    """ours[e, a, b] = hf[e, r0 + b, a]: hf of shape (E, X, A) holds ours in rows [r0, r0 + B)."""

    def __init__(self, ours: str, hf: str, shape, hf_shape, r0: int):
        self.ours, self.hf, self.shape, self.r0 = ours, hf, tuple(shape), r0
        self.hf_shapes = {hf: tuple(hf_shape)}

    def read(self, source, box=None):
        e, a, (b0, b1) = _ranges(box, self.shape)
        return source.read(self.hf, _slices([e, (self.r0 + b0, self.r0 + b1), a])).transpose(1, 2)

    def write(self, hf_name, ours, out):
        out[:, self.r0 : self.r0 + self.shape[2]] = ours.transpose(1, 2)

"""SwiGLU experts stacked on an expert axis, computed as grouped GEMMs or a readable loop.

Shape legend: N rows (token-slots) sorted by expert, D model dim, F expert hidden,
E experts held by this module (all of them at ep=1, a contiguous slice under ep>1).

The canonical weights are the three stacked tensors w1_EDF (gate), w3_EDF (up) and w2_EFD
(down) on the GLOBAL expert axis; expert parallelism keeps rows [offset, offset + E) of them.
Checkpoints and other backends read exactly these tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.config import check_expert_parallel
from model.errors import ConfigError
from model.moe.dispatch import compiled


def _gmm(a: torch.Tensor, b: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(a, b, offs=offs_E)


def _swiglu(h1_NF: torch.Tensor, h3_NF: torch.Tensor) -> torch.Tensor:
    """silu(h1) * h3."""
    return F.silu(h1_NF).mul_(h3_NF)


def _swiglu_grads(dh_NF: torch.Tensor, h1_NF: torch.Tensor, h3_NF: torch.Tensor):
    """(dh1, dh3) from the gradient of h = silu(h1) * h3. Overwrites dh_NF (dead afterwards):
    eager, that keeps three (N, F) temporaries alive at most, not five."""
    silu_NF = F.silu(h1_NF)
    dh3_NF = dh_NF * silu_NF
    del silu_NF
    return torch.ops.aten.silu_backward(dh_NF.mul_(h3_NF), h1_NF), dh3_NF


class Pointwise(NamedTuple):
    """The SwiGLU activation's elementwise math, forward and backward, as two functions."""

    swiglu: Callable
    grads: Callable


EAGER = Pointwise(_swiglu, _swiglu_grads)


@functools.cache
def compiled_pointwise() -> Pointwise:
    """The same two functions through torch.compile: each one fused kernel (Triton on CUDA).
    Eager they read or write an (N, F) tensor 5 times forward and 16 backward (with the
    recompute); fused, 3 and 9 (one of them writing back the overwritten input gradient).
    Shapes are dynamic: N changes with the routing under expert parallelism."""
    return Pointwise(compiled(_swiglu), compiled(_swiglu_grads))


class _GroupedSwiGLU(torch.autograd.Function):
    """y = (silu(x @ w1) * (x @ w3)) @ w2 per expert group, saving 2 (N, F) activations, not 4.

    Autograd on the plain expression keeps h1 (silu's input), silu(h1) and h3 (the product's
    inputs) and h (w2's input): four (N, F) tensors per layer, the largest activations of an
    MoE model. This keeps x, h1 and h3 and recomputes silu(h1) and h in backward, one
    elementwise pass next to six GEMMs. The backward uses the same ops autograd would
    (grouped_mm with transposed operands, aten.silu_backward), so the gradients are the same
    numbers. It also makes the incoming gradient contiguous: grouped_mm rejects the zero
    strides of broadcast gradients (e.g. from `y.sum()`).

    `pointwise` does the elementwise math (EAGER, or compiled_pointwise()'s fused kernels).
    `dtype` is the GEMMs' dtype (autocast's, or the weights' own). The weights are cast inside
    and the originals saved (they are held anyway): saving the casts would keep a bf16 copy of
    every expert weight per layer until backward. Backward casts them again.
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E, dtype, pointwise=EAGER):
        ctx.dtype, ctx.pointwise = dtype, pointwise
        x_ND = x_ND.to(dtype)
        h1_NF = _gmm(x_ND, w1_EDF.to(dtype), offs_E)
        h3_NF = _gmm(x_ND, w3_EDF.to(dtype), offs_E)
        ctx.save_for_backward(x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E, h1_NF, h3_NF)
        return _gmm(pointwise.swiglu(h1_NF, h3_NF), w2_EFD.to(dtype), offs_E)

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, w1, w3, w2, offs_E, h1_NF, h3_NF = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        w1_EDF, w3_EDF, w2_EFD = (w.to(ctx.dtype) for w in (w1, w3, w2))
        dy_ND = dy_ND.contiguous().to(ctx.dtype)
        dw2 = _gmm(ctx.pointwise.swiglu(h1_NF, h3_NF).mT, dy_ND, offs_E) if need_w2 else None
        dh1_NF, dh3_NF = ctx.pointwise.grads(_gmm(dy_ND, w2_EFD.mT, offs_E), h1_NF, h3_NF)
        dx = None
        if need_x:
            dx = _gmm(dh1_NF, w1_EDF.mT, offs_E).add_(_gmm(dh3_NF, w3_EDF.mT, offs_E))
        dw1 = _gmm(x_ND.mT, dh1_NF, offs_E).to(w1.dtype) if need_w1 else None
        dw3 = _gmm(x_ND.mT, dh3_NF, offs_E).to(w3.dtype) if need_w3 else None
        dw2 = dw2.to(w2.dtype) if need_w2 else None
        return dx, dw1, dw3, dw2, None, None, None


class SwiGLUExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "grouped_mm"):
        super().__init__()
        if impl not in ("grouped_mm", "loop"):
            raise ConfigError(f"expert impl ({impl!r}) must be grouped_mm or loop")
        self.impl = impl
        self.pointwise = EAGER  # compile_pointwise() swaps in the fused version
        self.num_global_experts = num_experts
        self.expert_offset = 0  # global id of local expert 0; set by shard_()
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def compile_pointwise(self) -> None:
        """Fuse the SwiGLU activation's elementwise passes with torch.compile (train.compile);
        the GEMMs stay grouped_mm. The loop reference is left as it is."""
        self.pointwise = compiled_pointwise()

    @property
    def num_local_experts(self) -> int:
        return self.w1_EDF.shape[0]

    def shard_(self, rank: int, size: int) -> None:
        """Keep only this expert-parallel rank's contiguous slice of the global experts."""
        check_expert_parallel(self.num_global_experts, size)
        if self.num_local_experts != self.num_global_experts:
            raise RuntimeError(
                f"the experts are sharded already ({self.num_local_experts} of "
                f"{self.num_global_experts} from expert {self.expert_offset}): shard_ takes the "
                "unsharded layer"
            )
        per_rank = self.num_global_experts // size
        start = rank * per_rank
        for name in ("w1_EDF", "w3_EDF", "w2_EFD"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.detach()[start : start + per_rank].clone()))
        self.expert_offset = start

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """x_ND holds the rows of local expert 0, then expert 1, ... (counts in tokens_per_expert_E)."""
        if self.impl == "loop":
            return self._forward_loop(x_ND, tokens_per_expert_E)
        # offs[e] = end row of expert e; stays on device, so no host synchronisation here.
        offs_E = torch.cumsum(tokens_per_expert_E, dim=0).to(torch.int32)
        # Autocast leaves grouped_mm alone (it is not on its lists): the GEMMs run in its dtype
        # anyway, as a matmul's would, and the fp32 weights get fp32 gradients.
        device = x_ND.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else self.w1_EDF.dtype)
        return _GroupedSwiGLU.apply(x_ND, self.w1_EDF, self.w3_EDF, self.w2_EFD, offs_E, dtype,
                                    self.pointwise)

    def _forward_loop(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """The readable reference: one dense SwiGLU per expert on its slice of rows."""
        outputs = []
        # Host synchronisation: the loop needs the row counts on the host.
        for e, rows in enumerate(x_ND.split(tokens_per_expert_E.tolist())):
            h = F.silu(rows @ self.w1_EDF[e]) * (rows @ self.w3_EDF[e])
            outputs.append(h @ self.w2_EFD[e])
        return torch.cat(outputs) if outputs else x_ND.new_zeros(x_ND.shape)

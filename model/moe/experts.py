"""SwiGLU experts stacked on an expert axis, computed as grouped GEMMs or a readable loop.

Shape legend: N rows (token-slots) sorted by expert, D model dim, F expert hidden,
E experts held by this module (all of them at ep=1, a contiguous slice under ep>1).

The canonical weights are the three stacked tensors w1_EDF (gate), w3_EDF (up) and w2_EFD
(down) on the GLOBAL expert axis; expert parallelism keeps rows [offset, offset + E) of them.
Checkpoints and other backends read exactly these tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ConfigError


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's backward rejects gradients with zero strides (e.g. from `y.sum()`), which
    autograd produces for broadcast gradients. Costs a copy only when the grad is strided.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped(x_ND: torch.Tensor, w_EXY: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(F.grouped_mm(x_ND, w_EXY, offs=offs_E))


class SwiGLUExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "grouped_mm"):
        super().__init__()
        if impl not in ("grouped_mm", "loop"):
            raise ConfigError(f"expert impl ({impl!r}) must be grouped_mm or loop")
        self.impl = impl
        self.num_global_experts = num_experts
        self.expert_offset = 0  # global id of local expert 0; set by shard_()
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))

    @property
    def num_local_experts(self) -> int:
        return self.w1_EDF.shape[0]

    def shard_(self, rank: int, size: int) -> None:
        """Keep only this expert-parallel rank's contiguous slice of the global experts."""
        if self.num_global_experts % size:
            raise ConfigError(
                f"num_experts ({self.num_global_experts}) must be divisible by the "
                f"expert-parallel size ({size})"
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
        h_NF = F.silu(_grouped(x_ND, self.w1_EDF, offs_E)) * _grouped(x_ND, self.w3_EDF, offs_E)
        return _grouped(h_NF, self.w2_EFD, offs_E)

    def _forward_loop(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """The readable reference: one dense SwiGLU per expert on its slice of rows."""
        outputs = []
        # Host synchronisation: the loop needs the row counts on the host.
        for e, rows in enumerate(x_ND.split(tokens_per_expert_E.tolist())):
            h = F.silu(rows @ self.w1_EDF[e]) * (rows @ self.w3_EDF[e])
            outputs.append(h @ self.w2_EFD[e])
        return torch.cat(outputs) if outputs else x_ND.new_zeros(x_ND.shape)

"""The native MoE backend: route, dispatch, compute, combine, in our own code.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, K choices per token;
t = T / tp, this tensor-parallel rank's slice of the tokens.
"""

from __future__ import annotations

import torch

from model.config import MoEConfig
from model.moe.dispatch import ExpertComm, LocalComm, combine, dispatch
from model.moe.layer import MoELayer, to_autocast_dtype
from model.moe.router import RouterOutput


class NativeMoE(MoELayer):
    """Dropless top-k MoE with SwiGLU experts (moe.backend = native).

    At ep=1 `comm` is the identity. Under tensor parallelism the input is replicated over the
    tp group. Every tp rank routes all tokens (cheap, and the router and its losses stay
    replicated), then dispatches only its 1/tp slice of them, so no expert sees a token twice;
    the outputs are gathered back. `tp.split`'s backward all-gathers the slices' gradients, so
    the router and the input get the full, identical gradient on every tp rank.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__(dim, cfg)
        self.comm: ExpertComm = LocalComm()
        self.fused = False  # compile_kernels() sets it

    def set_expert_parallel(self, comm: ExpertComm) -> None:
        self.comm = comm

    def compile_kernels(self) -> None:
        """torch.compile's fused kernels (Triton on CUDA) for the elementwise work around the
        GEMMs: the dispatch backward's gather-and-sum, the combine (un-permute, weight, sum)
        both ways, and the SwiGLU activation. Eager ops stay the readable reference."""
        self.fused = True
        self.experts.compile_pointwise()

    def routed(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        route = self.router(x_TD)  # in fp32 whatever the dtype
        x_TD = to_autocast_dtype(x_TD)
        # This tp rank's token slice (all of them at tp = 1); T is divisible by tp.
        x_td, weight_tK = self.tp.split(x_TD), self.tp.split(route.topk_weight_TK)
        n = x_td.shape[0]
        idx_tK = route.topk_idx_TK[self.tp.rank * n : (self.tp.rank + 1) * n]
        # At tp 1 the slice is every token, which the router has counted already.
        counts_E = route.counts_E if self.tp.size == 1 else None
        x_grouped, plan = dispatch(x_td, idx_tK, self.num_experts, self.comm, counts_E, self.fused)
        y_grouped = self.experts(x_grouped, plan.tokens_per_expert)
        y_TD = self.tp.gather(combine(y_grouped, weight_tK, plan, self.comm, self.fused))
        return y_TD.view_as(x_BSD), route

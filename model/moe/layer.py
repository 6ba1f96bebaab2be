"""The MoE feed-forward layer: route, dispatch, compute, combine.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, K choices per token.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import MoEConfig
from model.moe.dispatch import ExpertComm, LocalComm, combine, dispatch
from model.moe.experts import SwiGLUExperts
from model.moe.router import RouterOutput, TopKRouter


class MoELayer(nn.Module):
    """Dropless top-k MoE with SwiGLU experts (the `native` backend).

    Expert parallelism is applied from outside (parallel.expert_parallel): it shards
    `experts` and injects the expert-parallel `comm`; at ep=1 `comm` is the identity.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, cfg.renormalize)
        self.experts = SwiGLUExperts(cfg.num_experts, dim, cfg.expert_hidden, cfg.expert_impl)
        self.comm: ExpertComm = LocalComm()

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        route = self.router(x_TD)
        x_grouped, plan = dispatch(x_TD, route.topk_idx_TK, self.num_experts, self.comm)
        y_grouped = self.experts(x_grouped, plan.tokens_per_expert)
        y_TD = combine(y_grouped, route.topk_weight_TK, plan, self.comm)
        return y_TD.view_as(x_BSD), route

"""The MoE feed-forward interface every backend implements, and what the backends share.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, K choices per token;
t = T / tp, this tensor-parallel rank's slice of the tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from model.config import MoEConfig
from model.layers import SwiGLU
from model.moe.dispatch import ExpertComm
from model.moe.experts import SwiGLUExperts
from model.moe.router import RouterOutput, TopKRouter
from model.tp import LocalTP, TensorParallelComm


def to_autocast_dtype(x_TD: torch.Tensor) -> torch.Tensor:
    """The tokens in autocast's dtype when autocast is on (else as they are). Routing reads the
    tokens first, in fp32; the experts then compute in autocast's dtype, so casting the T rows
    once here, not their T x K copies after dispatch, halves what the gather and the
    all-to-alls move."""
    device = x_TD.device.type
    return x_TD.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x_TD


class MoELayer(nn.Module, ABC):
    """What every MoE backend is: the canonical weights and two hooks.

    Canonical weights (the same names and shapes in every backend, so checkpoints move
    between them): `router.weight` (E, D) and `experts.w1_EDF`, `experts.w3_EDF`,
    `experts.w2_EFD` on the global expert axis; with moe.shared_expert_hidden, the shared
    expert `shared.w1/w3/w2` (a dense SwiGLU, common to every backend), and with
    moe.shared_expert_gate its gate `shared_gate.weight` (1, D). Parallelism is applied
    from outside: parallel.expert_parallel shards `experts` and calls
    `set_expert_parallel(comm)`; parallel.tensor_parallel sets `tp` and splits `shared` like a
    dense FFN. forward(x_BSD) returns (y_BSD, RouterOutput): the routed experts' output (the
    backend's `routed`) plus the shared expert's.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, cfg.renormalizes,
                                 expert_bias=cfg.has_expert_bias, score_func=cfg.score_func,
                                 n_group=cfg.n_group, topk_group=cfg.topk_group,
                                 scaling=cfg.routed_scaling_factor)
        self.experts = SwiGLUExperts(cfg.num_experts, dim, cfg.expert_hidden, cfg.expert_impl)
        self.shared = SwiGLU(dim, cfg.shared_expert_hidden) if cfg.shared_expert_hidden else None
        # Replicated under tp: its input and its scalar per token are whole on every rank.
        self.shared_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.tp: TensorParallelComm = LocalTP()

    @abstractmethod
    def set_expert_parallel(self, comm: ExpertComm) -> None:
        """Use `comm` (this rank's expert-parallel group) for token exchange; the experts have
        already been sharded to this rank's slice."""

    @abstractmethod
    def routed(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """The routed experts' weighted output for x_BSD, and what the router decided."""

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        y_BSD, route = self.routed(x_BSD)
        if self.shared is not None:
            shared_BSD = self.shared(x_BSD)
            if self.shared_gate is not None:
                shared_BSD = torch.sigmoid(self.shared_gate(x_BSD)) * shared_BSD
            y_BSD = y_BSD + shared_BSD
        return y_BSD, route

    def compile_kernels(self) -> None:
        """train.compile: fuse what this backend leaves to elementwise torch ops (nothing by
        default: DeepSpeed and MegaBlocks bring their own kernels)."""

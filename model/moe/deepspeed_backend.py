"""moe.backend = deepspeed: DeepSpeed-MoE's top-k gate and MoE layer on our canonical weights.

DeepSpeed's `TopKGate` routes (fp32 softmax; top-1 weight = its probability, top-k >= 2
renormalised), assigns each token-slot a place in a per-expert capacity buffer (dropping
the overflow when drop_tokens is on), and DeepSpeed's `MOELayer` moves the (E, C, D) buffer
with an equal-split all-to-all and combines. Only the weights are ours: the gate reads
`router.weight` and the experts are our stacked `experts.w*` tensors, run as batched matmuls
over the capacity buffer. So checkpoints move between backends unchanged, and expert
parallelism shards the same tensors.

Reported like the native backend: DeepSpeed's own load-balancing loss as aux_loss (for
top_k 2 it counts only first choices), our router z-loss from the same logits, and the number
of dropped token-slots per layer. A token whose every slot is dropped gets exactly zero from
the routed experts: only the residual path (and the shared expert, if configured) carries it.

Shape legend: T tokens, D model dim, R expert-parallel ranks, El local experts, C capacity.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from model.config import MoEConfig
from model.moe.dispatch import ExpertComm
from model.moe.layer import MoELayer
from model.moe.router import RouterOutput


def import_deepspeed(use_cuda: bool):
    """Import DeepSpeed with the accelerator chosen and its slow-to-build CPU op switched off."""
    # The accelerator is chosen on first use from DS_ACCELERATOR; CPU needs no oneCCL/IPEX.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
    # DeepSpeed still calls all_gather_into_tensor, deprecated in torch 2.13; not actionable.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated",
                            category=FutureWarning)
    import deepspeed
    import deepspeed.ops

    # Skip DeepSpeed's shared-memory CPU collective: a g++ build on first use, and our
    # collectives run on gloo anyway. (A private table; checked against DeepSpeed 0.19.8.)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class _SharedWeight(nn.Module):
    """Stands in for the gate's own nn.Linear: reads our router's weight, owns nothing."""

    def __init__(self, router: nn.Module):
        super().__init__()
        object.__setattr__(self, "router", router)  # a reference, not a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.router.weight


class _ObservedGate(nn.Module):
    """DeepSpeed's gate, also counting the token-slots it dropped (index -1 after capacity).

    MOELayer calls the gate inside its forward and keeps only what it needs, so the count is
    left on this object for DeepSpeedMoE.forward to read right after (as MOELayer itself does
    with l_aux); it is never read across calls."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        self.gate = gate
        self.dropped_slots = torch.zeros((), dtype=torch.long)

    def forward(self, *args, **kwargs):
        out = self.gate(*args, **kwargs)
        indices = out[3]  # (l_aux, capacity, E, indices, locations, gates, exp_counts)
        self.dropped_slots = (indices < 0).sum().detach()
        return out

    def _set_ep_group(self, group) -> None:
        self.gate._set_ep_group(group)


class _CapacityExperts(nn.Module):
    """Our stacked SwiGLU experts on DeepSpeed's capacity buffer: batched matmuls."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        object.__setattr__(self, "stacked", experts)  # a reference, not a submodule

    def forward(self, x_REcD: torch.Tensor) -> torch.Tensor:
        R, El, C, D = x_REcD.shape
        ex = self.stacked
        x_END = x_REcD.transpose(0, 1).reshape(El, R * C, D)
        h_ENF = F.silu(torch.bmm(x_END, ex.w1_EDF)) * torch.bmm(x_END, ex.w3_EDF)
        return torch.bmm(h_ENF, ex.w2_EFD).reshape(El, R, C, D).transpose(0, 1)


class DeepSpeedMoE(MoELayer):
    """The deepspeed backend (tensor parallelism 1; the config refuses tp > 1 with it)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__(dim, cfg)
        self._deepspeed = import_deepspeed(torch.cuda.is_available())
        from deepspeed.moe.sharded_moe import MOELayer, TopKGate

        gate = TopKGate(dim, **cfg.deepspeed_gate_args())
        gate.wg = _SharedWeight(self.router)
        self.gate = _ObservedGate(gate)  # holds no parameters, so no canonical name changes
        ep_name = "ep_size_1"
        self._moe = MOELayer(self.gate, _CapacityExperts(self.experts), ep_name, ep_size=1,
                             num_local_experts=cfg.num_experts)

    def set_expert_parallel(self, comm: ExpertComm) -> None:
        # DeepSpeed's MoE layer reads the tensor-parallel size from its module-global `mpu`,
        # which the last ZeRO engine built in this process set. This layer runs at tp 1; an
        # mpu left by an earlier model at tp 2 (two models built in one process, as in
        # test_reshard.py) made it drop and gather tokens over that model's tp group. A ZeRO
        # engine for this model sets its own (tp 1) afterwards.
        from deepspeed.utils import groups
        from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

        if groups.mpu is not None and bwc_tensor_model_parallel_world_size(groups.mpu) != 1:
            groups.mpu = None
        if comm.size == 1:
            return
        # DeepSpeed's collectives go through deepspeed.comm, which wraps our existing group.
        self._deepspeed.comm.init_distributed(auto_mpi_discovery=False, verbose=False)
        self._moe.ep_size = comm.size
        self._moe.num_local_experts = self.num_experts // comm.size
        self._moe.ep_group_name = f"ep_size_{comm.size}"
        self._moe._set_ep_group(comm.group)

    def routed(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        route = self.router(x_BSD.reshape(-1, x_BSD.shape[-1]))  # our stats and z-loss
        y_BSD = self._moe(x_BSD, None)
        route = dataclasses.replace(route, aux_loss=self._moe.l_aux.float(),
                                    dropped_slots=self.gate.dropped_slots)
        # MOELayer keeps l_aux until its next call. Under train.recompute the backward runs this
        # forward again, and the l_aux it leaves is never backpropagated: kept, it would hold
        # that rerun's saved activations (the gate's, the norm's; with recompute=full the
        # attention's too) through the optimizer step.
        self._moe.l_aux = None
        return y_BSD, route

"""ZeRO stages 1 and 2 through DeepSpeed's engine, with our process groups as the truth.

DeepSpeed keeps module-global MoE groups (deepspeed.utils.groups). We fill them with our own
ep and edp groups before the engine exists, and hand it our dp/tp groups through an `mpu`
object, so it creates no groups of its own (tests/distributed/test_zero.py checks identity).

What DeepSpeed 0.19.8 does with them (read in its source, checked by the tests):
  - expert parameters are those with `allreduce = False`; `group_name` picks their group;
  - ZeRO-1/2 reduce-scatter each gradient bucket after dividing by the dp size: dense over
    dp, experts over edp. That is our rule (sum over edp / dp), nothing to correct;
  - it only takes the MoE path if the module tree contains one of its own `MoE` layers: an
    empty marker subclass stands in for it (our experts are not DeepSpeed's);
  - the engine divides the loss by gradient_accumulation_steps in backward and steps the
    optimizer at the accumulation boundary; clipping uses the global norm.
ZeRO-3 refuses MoE ("Native DeepSpeed MoE is not supported with ZeRO Stage 3"), so the config
refuses zero_stage 3.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from model.moe.deepspeed_backend import import_deepspeed
from parallel.collectives import named_region
from parallel.topology import Topology


DEEPSPEED_BUCKET = 500_000_000  # elements: DeepSpeed's default bucket, the cap of ours


class TopologyMPU:
    """The model-parallel-unit interface DeepSpeed queries, answered from our topology.

    It must not define initialize_sequence_parallel: DeepSpeed would then treat it as a
    sequence-parallel unit and look its dp group up elsewhere."""

    def __init__(self, topology: Topology):
        self.t = topology

    def get_data_parallel_group(self):
        return self.t.groups["dp"]

    def get_data_parallel_world_size(self):
        return self.t.size("dp")

    def get_data_parallel_rank(self):
        return self.t.coord("dp")

    def get_model_parallel_group(self):
        return self.t.groups["tp"]

    def get_model_parallel_world_size(self):
        return self.t.size("tp")

    def get_model_parallel_rank(self):
        return self.t.coord("tp")

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


def _engine_module(model: nn.Module, topology: Topology, group_name: str) -> nn.Module:
    """Our model plus, if it has MoE layers, an empty DeepSpeed `MoE` marker so the engine
    takes its MoE path (without it ZeRO-2 fails in its first expert reduction)."""
    from deepspeed.moe.layer import MoE

    class _MoEMarker(MoE):
        def __init__(self, num_experts: int):
            nn.Module.__init__(self)  # no experts of its own: ours live in the model
            self.num_experts, self.ep_size = num_experts, topology.size("ep")
            self.num_local_experts = num_experts // self.ep_size
            self.expert_group_name = group_name

        def set_deepspeed_parallelism(self, *args, **kwargs):
            pass  # the groups are ours, registered before the engine

    class _Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            if model.moe_layers():
                self.moe_marker = _MoEMarker(model.moe_layers()[0].num_experts)

        def forward(self, x, y):
            return self.model(x, y)

    return _Wrapped()


def register_groups(model: nn.Module, topology: Topology) -> str:
    """Mark our expert parameters for DeepSpeed and give it our ep/edp groups."""
    from deepspeed.utils import groups

    name = f"ep_size_{topology.size('ep')}"  # DeepSpeed parses the size from this name
    tables = (("ep", groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS),
              ("edp", groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS))
    for kind, group_table, ranks_table in tables:
        group_table[name] = topology.groups[kind]
        ranks_table[name] = next(g for g in topology.layout.group_ranks(kind) if topology.rank in g)
    for layer in model.moe_layers():
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = name
            # ZeRO partitions the expert state over edp, which includes tp partners, so each
            # tp rank holds a distinct piece. DeepSpeed's grad norm counts a parameter on
            # tp rank 0 only unless it is marked model-parallel; unmarked, tp partners' pieces
            # of the experts would be left out of the norm (tests/distributed/test_zero.py).
            p.model_parallel = topology.size("tp") > 1
    return name


class ZeroStepper:
    """trainer.optim.Stepper through a DeepSpeed engine (ZeRO stage 1 or 2)."""

    def __init__(self, model: nn.Module, topology: Topology, groups: list[dict],
                 make_optimizer: Callable[[list[dict]], torch.optim.Optimizer], *, stage: int,
                 micro_batch_size: int, grad_accum: int, grad_clip: float, local_rank: int,
                 bf16: bool = False):
        device = next(model.parameters()).device
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # the engine asserts it is set
        deepspeed = import_deepspeed(device.type == "cuda")
        from deepspeed.moe.utils import (
            split_params_into_different_moe_groups_for_optimizer,
        )

        self.topology, self.zero_stage = topology, stage
        self.what = (f"DeepSpeed ZeRO-{stage} backward and step (gradients reduced over dp, "
                     "experts' over edp)")
        group_name = register_groups(model, topology)
        optimizer = make_optimizer(split_params_into_different_moe_groups_for_optimizer(groups))
        bucket = int(min(DEEPSPEED_BUCKET, sum(p.numel() for p in model.parameters())))
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip,
            # Buckets no larger than the model: DeepSpeed's default (5e8 elements) allocates
            # gigabytes of gradient buffer for any model, a small one included.
            "zero_optimization": {"stage": stage, "reduce_scatter": True,
                                  "contiguous_gradients": True, "overlap_comm": False,
                                  "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
            # bf16 weights and compute with fp32 master weights (train.precision).
            "bf16": {"enabled": bf16},
            "steps_per_print": 1 << 30,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_engine_module(model, topology, group_name), optimizer=optimizer,
            config=config, mpu=TopologyMPU(topology), dist_init_required=False,
        )

    def begin(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, x, y):
        return self.engine(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed's own collectives run here, on our groups: name them if they fail.
        with named_region(self.what, self.topology.groups["dp"], only_comm_errors=True):
            self.engine.backward(loss)  # divides by gradient_accumulation_steps
            self.engine.step()  # updates only at the accumulation boundary

    def finish(self) -> torch.Tensor:
        """The global gradient norm of the step the engine took at the accumulation boundary
        (inf when it found the gradients non-finite: then it skipped the step)."""
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(norm if norm is not None else float("nan"), dtype=torch.float32)

    def update(self) -> None:
        """Nothing: the engine updated (or skipped a non-finite step) in backward."""

"""ZeRO stage 3 as a transform: PyTorch FSDP2 (`fully_shard`) over our dp and edp groups.

Applied after tensor and expert parallelism, to the plain local tensors they leave: each
rank's dp group shards its own tp shard of every dense parameter (norms, router, embedding,
which tp replicates, are sharded over dp in every tp column alike), and the edp group shards
this rank's ep slice of the experts. So dense and expert parameters live on different
groups, as torchtitan and Megatron-FSDP do it; DeepSpeed's ZeRO-3 cannot.

Units (each one all-gather before its forward and again before its backward, one
reduce-scatter of its gradients after its backward; at most one block is gathered at a time):
    per block       the block's dense parameters (attention, norms, router, shared expert) on
                    the dp mesh, and nested inside it the routed experts on the edp mesh;
    tok_embeddings  on the dp mesh;
    norm + output   one unit on the dp mesh, kept gathered from forward to backward (backward
                    starts with it);
    root            whatever is left (the tied embedding and output, if tied).
Tensor parallelism's collectives and the experts' all-to-alls run unchanged inside them.

Gradient scale (parallel/data_parallel.py's rule): FSDP sums over the unit's mesh and divides
by a factor, the mesh size by default. Dense: dp mesh, dp: the mean over dp. Experts: summed
over edp and divided by dp, so their factor is set to dp. Reductions are sums followed by the
division on every backend (gloo has no pre-scaled sum).

Backends whose MoE layer reads the stacked expert weights outside `experts.forward`
(megablocks' grouped GLU, deepspeed's capacity experts) would see the sharded DTensors there:
for them the layer's `routed` becomes a forward method of the experts unit
(register_fsdp_forward_method), so the experts are gathered around the whole routed path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import Shard
from torch.nn.utils import get_total_norm

from model.moe import MoELayer
from model.moe.native_backend import NativeMoE
from parallel.collectives import all_reduce
from parallel.expert_parallel import split_parameters
from parallel.topology import Topology

# What tensor parallelism records on its shards (parallel/tensor_parallel.py); fully_shard
# replaces every parameter with a new DTensor parameter, which gets them back.
TP_ATTRIBUTES = ("tp_partition_dim", "tensor_model_parallel")


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """train.precision at stage 3: bf16 compute gathers bf16 copies of the fp32 sharded
    parameters (which are the master weights Adam updates) and reduces gradients in fp32;
    fp32 gathers and reduces the parameters as they are."""
    if dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def expert_shard_dim(shape: torch.Size, edp: int) -> int:
    """The dim of a stacked expert weight (E_local, ., .) that edp ranks split: the expert axis
    when it divides evenly, else the first other dim that does (FSDP2 splits dims other than
    0 only evenly), else the expert axis unevenly. Splitting E_local < edp experts on dim 0
    would leave some ranks empty and others holding whole experts."""
    for dim in range(len(shape)):
        if shape[dim] % edp == 0:
            return dim
    return 0


def apply_fully_shard(model: nn.Module, topology: Topology, mp_policy: MixedPrecisionPolicy) -> None:
    """Shard the (tp- and ep-transformed, device-placed) model in place; see the module doc.
    Call before the optimizer exists: every parameter becomes a DTensor parameter."""
    device = next(model.parameters()).device.type
    dp, edp = topology.size("dp"), topology.size("edp")
    dp_mesh = DeviceMesh.from_group(topology.groups["dp"], device)
    edp_mesh = DeviceMesh.from_group(topology.groups["edp"], device)
    attributes = {name: {a: getattr(p, a) for a in TP_ATTRIBUTES if hasattr(p, a)}
                  for name, p in model.named_parameters()}

    def shard(module, mesh: DeviceMesh, **kwargs) -> None:
        fully_shard(module, mesh=mesh, mp_policy=mp_policy, **kwargs)
        # Sum, then divide: gloo has no pre-scaled sum. Not on a 1-rank mesh, where torch
        # 2.13 divides by a custom factor twice (the experts' at edp 1).
        for unit in module if isinstance(module, list) else [module]:
            unit.set_force_sum_reduction_for_comms(mesh.size() > 1)

    for block in model.layers:
        if isinstance(block.ffn, MoELayer):
            experts = block.ffn.experts
            shard(experts, edp_mesh, reshard_after_forward=True,
                  shard_placement_fn=lambda p: Shard(expert_shard_dim(p.shape, edp)))
            experts.set_gradient_divide_factor(float(dp))
            if not isinstance(block.ffn, NativeMoE):
                _gather_around_routed(block.ffn)
        shard(block, dp_mesh)
    if not model.cfg.tie_embeddings:  # a tied weight belongs to one unit: the root's
        shard(model.tok_embeddings, dp_mesh)
        shard([model.norm, model.output], dp_mesh, reshard_after_forward=False)
    shard(model, dp_mesh)
    for name, p in model.named_parameters():
        for key, value in attributes[name].items():
            setattr(p, key, value)


def _gather_around_routed(layer: MoELayer) -> None:
    """Make the layer's `routed` a forward method of its experts' FSDP unit: gathered before
    it, resharded after, gathered again before its backward, reduce-scattered after that."""
    experts = layer.experts
    experts.fsdp_routed = layer.routed  # the bound method, called through the unit
    register_fsdp_forward_method(experts, "fsdp_routed")
    layer.routed = experts.fsdp_routed
    # FSDP warns that routed returns a view (its pre-backward hook would be lost to an
    # in-place op on it): MoELayer.forward and the block only add to it out of place.
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"FSDP2-wrapped module \(FSDPSwiGLUExperts\) returned a view")


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fully_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Every unit back to its shards (no collective): after an evaluation, the units kept
    gathered from forward to backward are still gathered, and checkpoints read the shards."""
    for module in fsdp_modules(model):
        module.reshard()


def _local_grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """This rank's shard of each gradient (a parameter no backward reached gets zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad.to_local() for p in params]


def global_grad_norm(dense: list[nn.Parameter], expert: list[nn.Parameter],
                     topology: Topology) -> torch.Tensor:
    """L2 norm of the full model's gradient from the local shards, the same on every rank.

    Across the world every element of an expert or tp-sharded parameter sits on exactly one
    rank (ep x edp and tp x dp split them); a dense parameter tp does not split sits once in
    every tp column, so only tp rank 0 counts it. One all-reduce of the squared sum."""
    first_column = topology.coord("tp") == 0
    counted = expert + [p for p in dense
                        if first_column or getattr(p, "tensor_model_parallel", False)]
    grads = _local_grads(counted)
    square = (get_total_norm(grads).float().square() if grads
              else torch.zeros((), device=(dense + expert)[0].device))
    all_reduce(square, None)
    return square.sqrt()


class FsdpStepper:
    """trainer.optim.Stepper at zero_stage 3, for a model apply_fully_shard has sharded.

    Gradient accumulation: only the last micro-batch's backward reduce-scatters; the others
    leave each unit's gradient unsharded and summed locally (set_requires_gradient_sync), so
    between micro-batches a rank holds its whole (tp/ep-local) gradient, as at stage 0, in
    the reduce dtype (fp32). parallel.fsdp_reduce_every_micro_batch keeps it at 1/dp instead,
    for a reduce-scatter per micro-batch.
    """

    zero_stage = 3

    def __init__(self, model: nn.Module, topology: Topology,
                 make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer], *,
                 grad_accum: int, grad_clip: float, reduce_every_micro_batch: bool = False):
        if not is_fully_sharded(model):
            raise TypeError("zero_stage 3 trains a model that parallel.fsdp.apply_fully_shard "
                            "has sharded (launcher.train.build_model does it)")
        self.model, self.topology = model, topology
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.reduce_every_micro_batch = reduce_every_micro_batch
        # The sharded DTensor parameters: Adam's state is sharded with them.
        self.dense, self.expert = split_parameters(model)
        self.optimizer = make_optimizer(self.dense + self.expert)
        self.micro = 0

    def begin(self, lr: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.micro = 0

    def forward(self, x, y):
        return self.model(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        self.micro += 1
        sync = self.reduce_every_micro_batch or self.micro == self.grad_accum
        self.model.set_requires_gradient_sync(sync)
        (loss / self.grad_accum).backward()

    def finish(self) -> torch.Tensor:
        """The pre-clip global norm; gradients clipped in place (min(1, clip / (norm + 1e-6)),
        torch's clip_grad_norm_ arithmetic)."""
        norm = global_grad_norm(self.dense, self.expert, self.topology)
        if self.grad_clip > 0:
            scale = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(_local_grads(self.dense + self.expert), scale)
        return norm

    def update(self) -> None:
        self.optimizer.step()

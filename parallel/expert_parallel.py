"""Expert parallelism as a transform of a plainly built model."""

from __future__ import annotations

from torch import nn

from model.moe.dispatch import LocalComm
from parallel.collectives import ProcessGroupExpertComm
from parallel.topology import Topology


def apply_expert_parallel(model: nn.Module, topology: Topology) -> None:
    """Keep this rank's slice of every MoE layer's experts and inject the ep communicator.

    Call before building the optimizer: the expert parameters are replaced by their slices.
    The model was built with the same seed on every rank, so slicing keeps exactly the
    weights an ep=1 run would use for these experts.
    """
    ep = topology.size("ep")
    comm = ProcessGroupExpertComm(topology.groups["ep"]) if ep > 1 else LocalComm()
    for layer in model.moe_layers():
        layer.experts.shard_(comm.rank, comm.size)
        layer.set_expert_parallel(comm)


def expert_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that live on the expert axis (sharded over ep)."""
    return {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) parameters: they reduce over different groups."""
    expert_ids = expert_parameter_ids(model)
    dense = [p for p in model.parameters() if id(p) not in expert_ids]
    expert = [p for p in model.parameters() if id(p) in expert_ids]
    return dense, expert

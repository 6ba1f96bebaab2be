"""Bring a model's per-parameter tensors to their global shape on every rank, for comparing a
parallel layout with one process (checkpoints never gather: each rank writes its pieces)."""

from __future__ import annotations

import torch
from torch import nn

from parallel.collectives import all_gather_cat
from parallel.expert_parallel import expert_parameter_ids
from parallel.topology import Topology


def gather_global(model: nn.Module, topology: Topology, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors named like the model's parameters (weights, gradients), at global shape.
    Collective: every rank must pass the same names in the same order."""
    experts = expert_parameter_ids(model)
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in local.items():
        param = params.get(name)
        if param is not None and id(param) in experts and topology.size("ep") > 1:
            tensor = all_gather_cat(tensor, topology.groups["ep"], topology.size("ep"), 0)
        elif param is not None and hasattr(param, "tp_partition_dim"):
            tensor = all_gather_cat(tensor, topology.groups["tp"], topology.size("tp"), param.tp_partition_dim)
        out[name] = tensor.detach().cpu().clone()
    return out

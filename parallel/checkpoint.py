"""Plain full checkpoints: model weights at their global shape in one file.

Expert tensors are gathered over the expert-parallel group onto the global expert axis and
tensor-parallel shards over the tp group, so a file saved at any (dp, tp, ep) loads at any other. This is the simple format for final weights and
for `checkpoint.init_from`; it does not carry optimizer state (the reshardable, sharded
format with optimizer and data state is a later piece of work).

File layout (torch.save of a dict): format, model (name -> tensor), step, tokens_seen,
layout (the saving run's degrees), config (the resolved job config as a dict).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.errors import ConfigError
from parallel.topology import Topology

FORMAT = "moe-train/full-v1"


def _gather(tensor: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_global(model: nn.Module, topology: Topology, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring per-parameter tensors (weights, gradients, optimizer moments) named like the
    model's parameters to their global shape on every rank: experts gathered over the ep group
    along the expert axis, tensor-parallel shards over the tp group along their split dim.
    Collective: every rank must pass the same names in the same order."""
    experts = {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in local.items():
        param = params.get(name)
        if param is not None and id(param) in experts and topology.size("ep") > 1:
            tensor = _gather(tensor, topology.groups["ep"], topology.size("ep"), 0)
        elif param is not None and hasattr(param, "tp_partition_dim"):
            tensor = _gather(tensor, topology.groups["tp"], topology.size("tp"), param.tp_partition_dim)
        out[name] = tensor.detach().cpu().clone()
    return out


def full_state_dict(model: nn.Module, topology: Topology) -> dict[str, torch.Tensor]:
    """The model's state at its global shape, on every rank. Collective."""
    return gather_global(model, topology, model.state_dict())


def save_full_checkpoint(
    path: str | Path, model: nn.Module, topology: Topology, meta: dict[str, Any]
) -> None:
    """Collective. Rank 0 writes `path` atomically (temporary file, fsync, rename); a write
    failure there becomes the same error on every rank instead of a hang."""
    path = Path(path)
    state = full_state_dict(model, topology)
    error = ""
    if topology.rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                torch.save({"format": FORMAT, "model": state, **meta}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            error = f"rank 0 could not write checkpoint {path}: {exc}"
    failed = torch.tensor([1 if error else 0])
    dist.all_reduce(failed)  # every rank learns whether the write succeeded
    if failed.item():
        raise OSError(error or f"checkpoint {path} was not written (rank 0 failed)")


def load_full_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load global-shape weights into a model built plainly, BEFORE any parallel transform
    (which then keeps this rank's shards); returns the file's metadata. Every tensor is checked
    before any is copied, so a mismatch changes nothing."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} checkpoint")
    saved, own = ckpt["model"], model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in own.items():
        if saved[name].shape != tensor.shape:
            raise ConfigError(
                f"{path}: tensor {name} has shape {tuple(saved[name].shape)} in the checkpoint "
                f"but the model needs {tuple(tensor.shape)}"
            )
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(saved[name])
    return {k: v for k, v in ckpt.items() if k != "model"}

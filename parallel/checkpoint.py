"""Plain full checkpoints: model weights at their global shape in one file.

Expert tensors are gathered over the expert-parallel group onto the global expert axis, so a
file saved at any ep loads at any other ep. This is the simple format for final weights and
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


def _expert_tensors(model: nn.Module) -> dict[str, tuple[nn.Parameter, int, int]]:
    """name -> (local tensor, global expert offset, global expert count) for expert weights."""
    owner = {}
    for layer in model.moe_layers():
        experts = layer.experts
        for p in experts.parameters():
            owner[id(p)] = (experts.expert_offset, experts.num_global_experts)
    return {n: (p, *owner[id(p)]) for n, p in model.named_parameters() if id(p) in owner}


def full_state_dict(model: nn.Module, topology: Topology) -> dict[str, torch.Tensor]:
    """Every parameter at its global shape, on every rank. Collective over the ep group."""
    experts = _expert_tensors(model)
    state = {}
    for name, tensor in model.state_dict().items():
        if name in experts and topology.size("ep") > 1:
            parts = [torch.empty_like(tensor) for _ in range(topology.size("ep"))]
            dist.all_gather(parts, tensor.contiguous(), group=topology.groups["ep"])
            tensor = torch.cat(parts)
        state[name] = tensor.detach().cpu().clone()
    return state


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
    """Load global-shape weights into a (possibly expert-sharded) model; returns the file's
    metadata. Every tensor is checked before any is copied, so a mismatch changes nothing."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} checkpoint")
    saved = ckpt["model"]
    experts = _expert_tensors(model)
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    pieces = {}
    for name, tensor in own.items():
        src = saved[name]
        want = tuple(tensor.shape)
        if name in experts:
            _, offset, num_global = experts[name]
            want = (num_global, *tensor.shape[1:])
            src_piece = src[offset : offset + tensor.shape[0]]
        else:
            src_piece = src
        if tuple(src.shape) != want:
            raise ConfigError(
                f"{path}: tensor {name} has shape {tuple(src.shape)} in the checkpoint but the "
                f"model needs {want}"
            )
        pieces[name] = src_piece
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(pieces[name])
    return {k: v for k, v in ckpt.items() if k != "model"}

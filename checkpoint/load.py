"""The collective load under any layout (resharding), and weights-only loads.

A checkpoint written under any (dp, tp, ep, zero_stage, backend) is read under any other:
each rank asks the reader for the blocks of the global tensors it holds now
(checkpoint/layout.py), whoever wrote them. Loading happens in two stages so a failure
changes nothing: every rank first reads and checks everything into new tensors, the ranks
exchange errors, and only then is anything copied into the model, the optimizer and the RNG.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from checkpoint.errors import CheckpointError, agree
from checkpoint.layout import Box, Shard, buffer_shards, shards
from checkpoint.optimizer import read_plain_state
from checkpoint.reader import Checkpoint, fetch_buffers, fetch_param, stored_names
from checkpoint.zero import read_zero_state
from parallel.topology import Topology


def read_optimizer_state(stepper, ckpt: Checkpoint, params: list[Shard]) -> list:
    """Read this rank's optimizer state from `ckpt` (ZeRO's partitions at stages 1 and 2,
    torch's AdamW state otherwise); returns the closures that install it (nothing is changed
    before they run)."""
    if stepper.zero_stage in (1, 2):
        return read_zero_state(stepper.optimizer, ckpt, params)
    return read_plain_state(stepper.optimizer, ckpt, params)


def check_fit(ckpt: Checkpoint, params: list[Shard], prefix: str = "model", exact: bool = True) -> None:
    """Every parameter (prefix model) or persistent buffer (prefix buffer) exists in the
    checkpoint at the same global shape, and (`exact`) nothing more; without `exact`, only
    those the checkpoint has are checked."""
    stored = stored_names(ckpt, prefix)
    ours = {s.name for s in params}
    if exact and stored != ours:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit this model: missing "
            f"{sorted(ours - stored)[:4]}, unexpected {sorted(stored - ours)[:4]}")
    for s in params:
        if s.name not in stored:
            continue  # only without `exact`
        saved = tuple(ckpt.tensors[f"{prefix}/{s.name}"]["shape"])
        if saved != s.global_shape:
            raise CheckpointError(f"checkpoint {ckpt.path}: {s.name} has global shape {saved}, "
                                  f"this model needs {s.global_shape}")


def load_checkpoint(ckpt: Checkpoint, model: nn.Module, stepper, topology: Topology) -> dict[str, Any]:
    """Load model, optimizer state and this rank's RNG state from a checkpoint written under
    any layout. Collective. Stage 1 reads and checks everything into new tensors; if any rank
    failed, every rank raises and nothing was changed; stage 2 copies (a failure there is
    reported on every rank too, though it may have copied some). Returns the metadata,
    with "rng_restored" saying whether this rank got its own saved RNG state back."""
    error, apply = None, []
    meta = dict(ckpt.meta)
    try:
        params, buffers = shards(model, topology), buffer_shards(model)
        check_fit(ckpt, params)
        check_fit(ckpt, buffers, "buffer")
        staged = [(s.block, fetch_param(ckpt, s)) for s in params] + fetch_buffers(ckpt, buffers)
        apply.append(lambda: _copy_params(staged))
        apply += read_optimizer_state(stepper, ckpt, params)
        rng = ckpt.manifest["rng"].get(str(topology.rank))
        meta["rng_restored"] = rng is not None and meta["layout"]["world_size"] == topology.layout.world_size
        if meta["rng_restored"]:
            states = {k.rsplit("/", 1)[1]: ckpt.load_file(rng["file"])[k].clone() for k in rng["keys"]}
            apply.append(lambda: _set_rng(states))
    except CheckpointError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
        error = f"{type(exc).__name__}: {exc}"
    agree(error, f"loading checkpoint {ckpt.path}")
    # Stage 2 copies into tensors that exist already, so it should not fail; if it does on one
    # rank (out of memory on a device copy, say), every rank learns it here, instead of the
    # others going on into training's collectives and timing out there.
    error = None
    try:
        for fn in apply:
            fn()
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
        error = (f"{type(exc).__name__}: {exc} (while copying the loaded state in: this rank's "
                 "model and optimizer may be partly loaded)")
    agree(error, f"installing checkpoint {ckpt.path}")
    return meta


def _copy_params(staged: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, values in staged:
            param.copy_(values.to(param.device, param.dtype))


def _set_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def load_weights(ckpt: Checkpoint, model: nn.Module) -> list[str]:
    """Model weights (fine-tuning start), into a plainly built model BEFORE any parallel
    transform, and the persistent buffers both have. Local, no collectives; checks every
    parameter before copying any. Returns a note per buffer only one side has: the model's
    keeps its initial value (a router bias starts at zero), the checkpoint's is not used."""
    params = [Shard(n, p, tuple(p.shape), Box.whole(p.shape), "world") for n, p in model.named_parameters()]
    check_fit(ckpt, params)
    buffers = buffer_shards(model)
    check_fit(ckpt, buffers, "buffer", exact=False)
    _copy_params([(s.param, fetch_param(ckpt, s)) for s in params] + fetch_buffers(ckpt, buffers))
    ours, stored = {s.name for s in buffers}, stored_names(ckpt, "buffer")
    return ([f"{n}: not in the checkpoint, starts at its initial value" for n in sorted(ours - stored)]
            + [f"{n}: in the checkpoint, not used by this model" for n in sorted(stored - ours)])

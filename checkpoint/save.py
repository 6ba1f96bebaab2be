"""The collective save: every rank writes the pieces it owns, rank 0 commits.

1. Rank 0 clears `step_N.partial/` (a previous attempt that died); everyone learns whether it
   could.
2. Every rank checks that its pieces are finite, writes its shard file (fsync, rename) and
   reports; all ranks exchange the reports, so a rank that failed is named in the same error
   on every rank, and nothing is committed.
3. Rank 0 writes the manifest and commits (checkpoint/store.py): COMMIT, rename, `latest`,
   retention. Everyone learns the outcome.
A failure at any point leaves the previous checkpoints and `latest` as they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from checkpoint.errors import (
    CheckpointError,
    StorageError,
    agree,
    os_error_in,
    raise_failed,
    write_failure,
)
from checkpoint.layout import Piece, Shard, buffer_shards, shards
from checkpoint.optimizer import plain_pieces
from checkpoint.zero import zero_pieces
from checkpoint.store import FORMAT, VERSION, commit, retain, step_dir_name, write_shard
from parallel.collectives import all_gather_object
from parallel.faults import fault_point
from parallel.topology import Topology


def model_pieces(params: list[Shard], topology: Topology, prefix: str = "model") -> list[Piece]:
    return [Piece(f"{prefix}/{s.name}", s.global_shape, s.box, (0, s.box.numel), s.block.detach())
            for s in params if s.writes_whole(topology)]


def optimizer_pieces(stepper, params: list[Shard], topology: Topology) -> tuple[list[Piece], int | None]:
    """The checkpoint pieces of the optimizer state this rank writes, and Adam's step count
    (None before the first step). `stepper` is trainer.optim's Stepper: ZeRO's partitions at
    stages 1 and 2, torch's AdamW state (DTensors at stage 3) otherwise."""
    if stepper.zero_stage in (1, 2):
        return zero_pieces(stepper.optimizer, params, topology)
    return plain_pieces(stepper.optimizer, params, topology)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def non_finite(pieces: list[Piece]) -> list[str]:
    """Names of the pieces holding a NaN or an infinity."""
    return [p.name for p in pieces
            if p.tensor.is_floating_point() and not bool(torch.isfinite(p.tensor).all())]


def save_checkpoint(root: Path, step: int, model: nn.Module, stepper, topology: Topology,
                    meta: dict[str, Any], keep_last: int = 0, protect: Path | None = None) -> Path:
    """Write checkpoint `root/step_N` from every rank in parallel and commit it. Collective.
    Raises CheckpointError (a non-finite tensor, a rank that failed) or StorageError (a file
    that could not be written), on every rank alike, having committed nothing. Retention
    (keep_last) never deletes `protect`: see checkpoint.store.retain."""
    final = root / step_dir_name(step)
    staging = final.with_name(final.name + ".partial")
    error = None
    if topology.rank == 0:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except OSError as exc:
            error = write_failure(staging, exc)
    agree(error, f"saving checkpoint {final}", StorageError)

    # 2. Every rank writes the pieces it owns, and its RNG state.
    file = f"shard_{topology.rank:05d}.pt"
    record, error, storage, listing, rng, adam_step = None, None, False, [], {}, None
    try:
        params = shards(model, topology)
        optim, adam_step = optimizer_pieces(stepper, params, topology)
        pieces = model_pieces(params, topology) + model_pieces(buffer_shards(model), topology, "buffer") + optim
        bad = non_finite(pieces)
        if bad:
            raise CheckpointError(f"{len(bad)} of {len(pieces)} tensors this rank holds are not "
                                  f"finite (NaN or inf), e.g. {bad[0]}: a diverged state is never saved")
        rng = {f"rng/{topology.rank}/{k}": v for k, v in rng_state().items()}
        listing = [(p.name, p.shape, str(p.tensor.dtype).removeprefix("torch."), p.box.to_json(),
                    list(p.flat), p.key) for p in pieces]
        record = write_shard(staging / file, {p.key: p.tensor for p in pieces} | rng)
    except CheckpointError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
        storage = os_error_in(exc) is not None
        error = write_failure(staging / file, exc) if storage else f"{type(exc).__name__}: {exc}"
    fault_point("checkpoint.shard_written", rank=topology.rank, step=step)
    results = all_gather_object((error, storage, file, record, listing, list(rng), adam_step))
    if topology.rank == 0 and any(r[0] for r in results):
        shutil.rmtree(staging, ignore_errors=True)
    raise_failed([r[0] for r in results], f"saving checkpoint {final}",
                 StorageError if any(r[1] for r in results) else CheckpointError)

    # 3. Rank 0 writes the manifest and commits; everyone learns the outcome.
    error = None
    if topology.rank == 0:
        try:
            for note in commit(staging, final, _manifest(step, meta, [r[2:] for r in results])):
                print(f"warning: {note}", flush=True)
            for warning in retain(root, keep_last, protect):
                print(f"warning: {warning}", flush=True)
        except OSError as exc:
            error = write_failure(final, exc)
            shutil.rmtree(staging, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
            error = f"cannot commit {final}: {type(exc).__name__}: {exc}"
            shutil.rmtree(staging, ignore_errors=True)
    agree(error, f"committing checkpoint {final}", StorageError)
    return final


def _manifest(step: int, meta: dict[str, Any], results: list) -> dict[str, Any]:
    tensors: dict[str, dict] = {}
    files, rng_keys, adam_steps = {}, {}, set()
    for rank, (file, record, listing, rng, adam_step) in enumerate(results):
        files[file] = record
        rng_keys[str(rank)] = {"file": file, "keys": rng}
        if adam_step is not None:
            adam_steps.add(adam_step)
        for name, shape, dtype, box, flat, key in listing:
            info = tensors.setdefault(name, {"shape": list(shape), "dtype": dtype, "pieces": []})
            info["pieces"].append({"box": box, "flat": flat, "file": file, "key": key})
    if len(adam_steps) > 1:
        raise CheckpointError(f"ranks disagree on the optimizer step count: {sorted(adam_steps)}")
    return {"format": FORMAT, "version": VERSION, "step": step, "files": files, "tensors": tensors,
            "rng": rng_keys, "finite": True,
            "meta": meta | {"adam_step": adam_steps.pop() if adam_steps else None}}

"""Reshardable checkpoints: every rank writes the pieces it owns, any layout reads them back.

What is stored (all at global shape, experts on the global expert axis):
    model/<param>               the parameters (the model's dtype)
    buffer/<name>               the persistent buffers (the routers' expert bias): state that
                                is not a parameter; replicated, in their own dtype
    master/<param>              fp32 master weights, only where they differ in dtype (ZeRO bf16)
    optim/<param>/exp_avg       Adam's moments, fp32, out of DeepSpeed's flat partitions with
    optim/<param>/exp_avg_sq    their padding removed when ZeRO is on
and in the manifest: step, Adam's step count, tokens and samples seen (the data position of
every dp rank follows from it, see trainer/data.py), the layout it was saved with, the resolved
config, the format version; per-rank RNG states go in each rank's shard file.

Why our own format and not torch.distributed.checkpoint: ZeRO fragments are flat ranges of a
parameter, which DCP's rectangular chunks cannot express without first gathering them; and we
want a checksum per file, a commit marker we control, and a reader that needs no process group
(the inspect CLI). The files are plain `torch.save` dicts of tensors, read with weights_only.

Save (collective): rank 0 clears `step_N.partial/`; every rank writes its shard file (fsync,
rename); all ranks exchange results, so a rank that failed is named in the same error on every
rank; rank 0 commits (parallel/checkpoint_store.py) and reports back. Load (collective): every
rank reads and checks everything it needs into staging tensors; ranks exchange errors; only if
none failed anywhere is anything copied into the model, the optimizer and the trainer.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from parallel.checkpoint_store import (
    FORMAT,
    VERSION,
    Checkpoint,
    CheckpointError,
    commit,
    retain,
    step_dir_name,
    write_shard,
)
from parallel.collectives import all_gather_cat, all_gather_object
from parallel.expert_parallel import expert_parameter_ids
from parallel.shards import Box, Shard, buffer_shards, shards
from parallel.topology import Topology


class Piece(NamedTuple):
    """A block (or a flat fragment of a block) of a global tensor, held by this rank."""

    name: str  # e.g. "model/layers.0.ffn.experts.w1_EDF", "optim/<param>/exp_avg"
    shape: tuple[int, ...]  # the global tensor's shape
    box: Box
    flat: tuple[int, int]  # range of the row-major flattened box
    tensor: torch.Tensor  # the values: the box, or the fragment as a 1-D tensor

    @property
    def key(self) -> str:
        return f"{self.name}|{','.join(map(str, self.box.offsets))}|{self.flat[0]}"


# Fault injection for the tests: "RANK@STEP" makes that rank SIGKILL itself right after
# writing its shard of the checkpoint of that step, before the commit.
KILL_IN_SAVE_ENV = "MOE_TEST_KILL_RANK_IN_SAVE"


def gather_global(model: nn.Module, topology: Topology, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring per-parameter tensors (weights, gradients) named like the model's parameters to
    their global shape on every rank (a test helper: checkpoints never gather). Collective:
    every rank must pass the same names in the same order."""
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


def model_pieces(params: list[Shard], topology: Topology, prefix: str = "model") -> list[Piece]:
    return [Piece(f"{prefix}/{s.name}", s.global_shape, s.box, (0, s.box.numel), s.param.detach())
            for s in params if s.writes_whole(topology)]


def _exchange(obj) -> list:
    return all_gather_object(obj)


def _raise_failed(errors: list[str | None], what: str) -> None:
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        ranks = [r for r, _ in failed]
        raise CheckpointError(f"{what} failed on rank(s) {ranks}; rank {failed[0][0]}: {failed[0][1]}")


def agree(error: str | None, what: str) -> None:
    """Collective over the world: if any rank has an error, every rank raises the same one,
    naming the ranks that failed."""
    _raise_failed(_exchange(error), what)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(root: Path, step: int, model: nn.Module, stepper, topology: Topology,
                    meta: dict[str, Any], keep_last: int = 0) -> Path:
    """Write checkpoint `root/step_N` from every rank in parallel and commit it. Collective."""
    final = root / step_dir_name(step)
    staging = final.with_name(final.name + ".partial")
    error = None
    if topology.rank == 0:
        try:
            shutil.rmtree(staging, ignore_errors=True)  # a previous attempt that died
            staging.mkdir(parents=True)
        except OSError as exc:
            error = f"cannot create {staging}: {exc}"
    agree(error, f"saving checkpoint {final}")

    # 1. Every rank writes the pieces it owns, and its RNG state.
    file = f"shard_{topology.rank:05d}.pt"
    record, error, listing, rng, adam_step = None, None, [], {}, None
    try:
        params = shards(model, topology)
        optim, adam_step = stepper.export_state(params, topology)
        pieces = model_pieces(params, topology) + model_pieces(buffer_shards(model), topology, "buffer") + optim
        rng = {f"rng/{topology.rank}/{k}": v for k, v in rng_state().items()}
        listing = [(p.name, p.shape, str(p.tensor.dtype).removeprefix("torch."), p.box.to_json(),
                    list(p.flat), p.key) for p in pieces]
        record = write_shard(staging / file, {p.key: p.tensor for p in pieces} | rng)
    except OSError as exc:
        error = f"cannot write {staging / file}: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
        error = f"{type(exc).__name__}: {exc}"
    if os.environ.get(KILL_IN_SAVE_ENV) == f"{topology.rank}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die with the shard half-committed
    results = _exchange((error, file, record, listing, list(rng), adam_step))
    if topology.rank == 0 and any(r[0] for r in results):
        shutil.rmtree(staging, ignore_errors=True)
    _raise_failed([r[0] for r in results], f"saving checkpoint {final}")

    # 2. Rank 0 writes the manifest and commits; everyone learns the outcome.
    error = None
    if topology.rank == 0:
        try:
            for note in commit(staging, final, _manifest(step, meta, results)):
                print(f"warning: {note}", flush=True)
            for warning in retain(root, keep_last):
                print(f"warning: {warning}", flush=True)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
            error = f"cannot commit {final}: {type(exc).__name__}: {exc}"
            shutil.rmtree(staging, ignore_errors=True)
    agree(error, f"committing checkpoint {final}")
    return final


def _manifest(step: int, meta: dict[str, Any], results: list) -> dict[str, Any]:
    tensors: dict[str, dict] = {}
    files, rng_keys, adam_steps = {}, {}, set()
    for rank, (_, file, record, listing, rng, adam_step) in enumerate(results):
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
            "rng": rng_keys, "meta": meta | {"adam_step": adam_steps.pop() if adam_steps else None}}


def fetch_param(ckpt: Checkpoint, shard: Shard) -> torch.Tensor:
    """A parameter's block, from the fp32 master copy where the checkpoint has one."""
    for prefix in ("master", "model"):
        values = ckpt.fetch(f"{prefix}/{shard.name}", shard.box, torch.float32)
        if values is not None:
            return values
    raise CheckpointError(f"checkpoint {ckpt.path} has no tensor model/{shard.name}")


def fetch_buffers(ckpt: Checkpoint, buffers: list[Shard]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, its stored values in its own dtype) for each of `buffers` the checkpoint has."""
    out = []
    for s in buffers:
        values = ckpt.fetch(f"buffer/{s.name}", s.box, s.param.dtype)
        if values is not None:
            out.append((s.param, values))
    return out


def fetch_moments(ckpt: Checkpoint, shard: Shard) -> dict[str, torch.Tensor]:
    """Adam's two moments of a parameter's block, fp32."""
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        values = ckpt.fetch(f"optim/{shard.name}/{key}", shard.box, torch.float32)
        if values is None:
            raise CheckpointError(f"checkpoint {ckpt.path} has optimizer steps but no "
                                  f"optim/{shard.name}/{key}")
        out[key] = values
    return out


def adam_step_count(step: int, optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """Adam's step count for `param`'s restored state, where torch's AdamW keeps it: on the
    parameter's device for the fused (CUDA) kernel, on the host for the per-tensor one."""
    fused = bool(optimizer.defaults.get("fused"))
    return torch.tensor(float(step), device=param.device if fused else "cpu")


def stored_names(ckpt: Checkpoint, prefix: str) -> set[str]:
    return {n.split("/", 1)[1] for n in ckpt.tensors if n.startswith(f"{prefix}/")}


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
        staged = [(s.param, fetch_param(ckpt, s)) for s in params] + fetch_buffers(ckpt, buffers)
        apply.append(lambda: _copy_params(staged))
        apply += stepper.stage_state(ckpt, params, topology)
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

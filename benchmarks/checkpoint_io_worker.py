"""One rank of benchmarks/checkpoint_io.py: build the model, take one optimizer step, then save
and load the same state with each variant, timed between barriers, every load checked bitwise.
Run by tests/distributed/spawn.py's run_distributed (a gloo group exists)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from benchmarks.checkpoint_io import BASE, LOADS, ROOT, SAVES, resident_fraction
from checkpoint.layout import buffer_shards, shards
from checkpoint.load import load_checkpoint
from checkpoint.optimizer import optimizer_pieces
from checkpoint.reader import open_checkpoint
from checkpoint.save import model_pieces, rng_state, save_checkpoint
from checkpoint.store import sha256_file, write_atomic
from launcher.config import load_config
from launcher.train import build_model
from parallel.topology import Topology
from trainer.optim import build_stepper


def timed(fn: Callable):
    """(seconds from a barrier before `fn` to a barrier after it: the slowest rank's time, result)."""
    dist.barrier()
    began = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - began, out


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def evict(folder: Path) -> None:
    """Drop the files' pages from the page cache (clean after fsync, so nothing is lost)."""
    for path in files_in(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(folder: Path) -> None:
    """Read every file once, so a warm load finds all of them in the page cache."""
    for path in files_in(folder):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def check_equal(got: dict, want: dict, what: str) -> None:
    if set(got) != set(want):
        raise RuntimeError(f"{what}: keys differ: {sorted(set(got) ^ set(want))[:4]}")
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} of {len(want)} tensors differ from the saved state, e.g. {bad[0]}")


class Rank:
    """This rank's model and optimizer, and the variants' save and load of their state."""

    def __init__(self, rank: int, overrides: list[str]):
        job = load_config(["--config", str(ROOT / "configs/cpu_tiny.yaml"), *BASE, *overrides])
        layout = job.validate(dist.get_world_size())
        self.rank, self.topo = rank, Topology.create(layout)
        self.model = build_model(job, self.topo, torch.device("cpu"))
        self.stepper = build_stepper(self.model, self.topo, job.train, job.parallel.zero_stage, rank)
        shape = (job.train.micro_batch_size, job.train.seq_len + 1)
        tokens = torch.randint(0, job.model.vocab_size, shape, generator=torch.Generator().manual_seed(rank))
        self.stepper.begin(job.train.lr)  # one step: Adam's moments exist
        self.stepper.backward(self.stepper.forward(tokens[:, :-1], tokens[:, 1:]).loss)
        self.stepper.finish()
        self.stepper.update()
        self.meta = {"step": 1, "layout": vars(layout), "zero_stage": job.parallel.zero_stage,
                     "moe_backend": job.moe.backend, "config": job.to_dict()}
        self.saved = {k: v.clone() for k, v in self.state().items()}
        self.file = f"rank_{rank:05d}.pt"

    def state(self) -> dict[str, torch.Tensor]:
        """What this rank writes into its shard file, keyed as there (checkpoint/save.py)."""
        params = shards(self.model, self.topo)
        pieces = (model_pieces(params, self.topo) + model_pieces(buffer_shards(self.model), self.topo, "buffer")
                  + optimizer_pieces(self.stepper, params, self.topo)[0])
        return {p.key: p.tensor for p in pieces} | {f"rng/{self.rank}/{k}": v for k, v in rng_state().items()}

    def perturb(self) -> None:
        """Zero every tensor a load must restore and move the RNG on, so a load that restores
        nothing cannot pass the check."""
        with torch.no_grad():
            for key, tensor in self.state().items():
                if not key.startswith("rng/"):
                    tensor.zero_()
        torch.rand(1)

    # -- the saves: folder -> what the loads need ------------------------------------------

    def save_ours(self, folder: Path):
        return save_checkpoint(folder, 1, self.model, self.stepper, self.topo, self.meta)

    def save_torch(self, folder: Path, fsync: bool = True):
        tensors = self.state()
        def save():
            with open(folder / self.file, "wb") as f:
                torch.save(tensors, f)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
        return save

    def save_dcp(self, folder: Path):
        tensors = {f"{self.rank}/{k}": v for k, v in self.state().items()}
        return lambda: dcp.save(tensors, storage_writer=dcp.FileSystemWriter(folder))

    # -- the loads: (what to time, what it restored or None (check this rank's live state), bytes read)

    def load_ours(self, path: Path, trusted: bool) -> tuple[dict | None, int]:
        ckpt = open_checkpoint(path)
        if trusted:
            ckpt.trust()
        load_checkpoint(ckpt, self.model, self.stepper, self.topo)
        files = ckpt.manifest["files"]
        return None, sum(files[name]["bytes"] for name in ckpt._files)  # the files this rank opened

    def load_torch(self, folder: Path) -> tuple[dict, int]:
        path = folder / self.file
        return torch.load(path, map_location="cpu", weights_only=True), path.stat().st_size

    def load_dcp(self, folder: Path) -> tuple[dict, int]:
        into = {f"{self.rank}/{k}": torch.zeros_like(v) for k, v in self.saved.items()}
        dcp.load(into, storage_reader=dcp.FileSystemReader(folder))
        mine = f"__{self.rank}_0.distcp"  # FileSystemWriter's file for this rank
        return {k.split("/", 1)[1]: v for k, v in into.items()}, (folder / mine).stat().st_size


def repetition(r: Rank, index: int, scratch: Path) -> dict:
    """Each variant saves, then loads warm and cold; in an order rotated by `index`."""
    out = {}
    order = SAVES[index % len(SAVES):] + SAVES[:index % len(SAVES)]
    for save in order:
        folder = scratch / save
        if r.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        if save == "ours":
            seconds, path = timed(lambda: r.save_ours(folder))
        else:
            action = {"torch": r.save_torch, "dcp": r.save_dcp,
                      "torch-nofsync": lambda f: r.save_torch(f, fsync=False)}[save](folder)
            seconds, path = timed(action)[0], folder
        rec = {"save_s": seconds, "bytes_written": sum(p.stat().st_size for p in files_in(folder)), "load": {}}
        if save == "ours":
            rec |= measure_apart(r, path)
        for name in LOADS[save]:
            rec["load"][name] = {}
            for cache in ("warm", "cold"):
                if r.rank == 0:
                    (evict if cache == "cold" else warm)(folder)
                dist.barrier()
                resident = resident_fraction(files_in(folder)) if r.rank == 0 else None
                if name.startswith("ours"):  # ours loads into the live model and optimizer
                    r.perturb()
                load = {"ours": lambda: r.load_ours(path, False), "ours-trusted": lambda: r.load_ours(path, True),
                        "torch": lambda: r.load_torch(folder), "dcp": lambda: r.load_dcp(folder)}[name]
                seconds, (got, nbytes) = timed(load)
                check_equal(r.state() if got is None else got, r.saved, f"{name} load ({cache})")
                rec["load"][name][cache] = {"s": seconds, "resident": resident}
                rec["load"][name]["bytes_read"] = nbytes
                del got
        out[save] = rec
        dist.barrier()
        if r.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    return out


def measure_apart(r: Rank, path: Path) -> dict:
    """What ours adds to torch.save, timed alone: the sha256 of each rank's file (ranks in
    parallel) and the manifest rank 0 serialises and writes atomically (fsync, rename)."""
    sha_s, _ = timed(lambda: sha256_file(path / f"shard_{r.rank:05d}.pt"))
    manifest = json.loads((path / "manifest.json").read_text())
    def write_manifest():
        if r.rank == 0:
            write_atomic(path.parent.parent / "manifest.timed.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    manifest_s, _ = timed(write_manifest)
    return {"sha256_s": sha_s, "manifest_s": manifest_s, "manifest_bytes": (path / "manifest.json").stat().st_size}


def worker(rank: int, world: int, overrides: list[str], reps: int, warmup: int, scratch: str) -> dict:
    """`warmup` repetitions first, reported apart: the first use of each code path and of the
    allocator's memory in a process costs more than the next (kept in the JSON, not in the medians)."""
    r = Rank(rank, overrides)
    state_bytes = sum(t.numel() * t.element_size() for t in r.saved.values())
    runs = [repetition(r, i, Path(scratch)) for i in range(warmup + reps)]
    return {"state_bytes": state_bytes, "warmup": runs[:warmup], "reps": runs[warmup:]}

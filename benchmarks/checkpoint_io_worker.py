"""One rank of benchmarks/checkpoint_io.py: build the model, take one optimizer step, then save
and load the same state with each variant, timed between barriers, every load checked bitwise.
Run by tests/distributed/spawn.py's run_distributed (a gloo group exists)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from checkpoint.layout import Piece, buffer_shards, shards
from checkpoint.load import load_checkpoint
from checkpoint.reader import open_checkpoint
from checkpoint.select import Found, choose
from checkpoint.save import model_pieces, non_finite, optimizer_pieces, rng_state, save_checkpoint
from checkpoint.store import commit, sha256_file
from launcher.config import load_config
from launcher.train import build_model
from parallel.topology import Topology
from trainer.optim import build_stepper

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--parallel.dp=4", "--parallel.ep=4", "--train.micro_batch_size=1", "--train.seq_len=32",
        "--logging.tensorboard=false"]
SAVES = ("ours", "torch", "torch-nofsync", "dcp")
LOADS = {"ours": ("ours", "ours-trusted"), "torch": ("torch",), "torch-nofsync": (), "dcp": ("dcp",)}


def resident_fraction(files: list[Path]) -> float | None:
    """The fraction of the files' pages in the page cache (util-linux fincore), None without it."""
    if not files or shutil.which("fincore") is None:
        return None
    cmd = ["fincore", "--bytes", "--noheadings", "--raw", "--output", "PAGES,SIZE", *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    page = os.sysconf("SC_PAGE_SIZE")
    pages, total = sum(map(int, out[0::2])), sum(-(-int(size) // page) for size in out[1::2])
    return round(pages / total, 4) if total else None


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
        raise RuntimeError(f"{what}: {len(bad)} of {len(want)} tensors differ from the saved state, "
                           f"e.g. {bad[0]}")


class Rank:
    """This rank's model and optimizer, and the variants' save and load of their state."""

    def __init__(self, rank: int, overrides: list[str]):
        job = load_config(["--config", str(ROOT / "configs/cpu_tiny.yaml"), *BASE, *overrides])
        layout = job.validate(dist.get_world_size())
        self.rank, self.topo, self.job = rank, Topology.create(layout), job
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
        self.file = f"rank_{rank:05d}.pt"  # the baselines' file of this rank

    def pieces(self) -> list[Piece]:
        """The pieces this rank writes, as checkpoint/save.py collects them."""
        params = shards(self.model, self.topo)
        return (model_pieces(params, self.topo) + model_pieces(buffer_shards(self.model), self.topo, "buffer")
                + optimizer_pieces(self.stepper, params, self.topo)[0])

    def state(self) -> dict[str, torch.Tensor]:
        """What this rank writes into its shard file, keyed as there."""
        rng = {f"rng/{self.rank}/{k}": v for k, v in rng_state().items()}
        return {p.key: p.tensor for p in self.pieces()} | rng

    def perturb(self) -> None:
        """Zero every tensor a load must restore and move the RNG on, so a load that restores
        nothing cannot pass the check."""
        with torch.no_grad():
            for key, tensor in self.state().items():
                if not key.startswith("rng/"):
                    tensor.zero_()
        torch.rand(1)

    def saver(self, variant: str, folder: Path) -> Callable[[], Path]:
        """What `variant` times to save into `folder`; it returns the path its loads read.
        The baselines' dicts are built before the clock starts (ours builds its own inside)."""
        if variant == "ours":
            return lambda: save_checkpoint(folder, 1, self.model, self.stepper, self.topo, self.meta)
        if variant == "dcp":
            keyed = {f"{self.rank}/{k}": v for k, v in self.state().items()}
            return lambda: (dcp.save(keyed, storage_writer=dcp.FileSystemWriter(folder)), folder)[1]
        tensors = self.state()

        def save() -> Path:
            with open(folder / self.file, "wb") as f:
                torch.save(tensors, f)
                f.flush()
                if variant == "torch":  # not torch-nofsync
                    os.fsync(f.fileno())
            return folder
        return save

    def loader(self, variant: str, at: Path) -> Callable[[], tuple[dict | None, int]]:
        """What `variant` times to load from `at`; it returns (the tensors it read, or None
        where it restored this rank's live state, the bytes of the files this rank read)."""
        def ours() -> tuple[None, int]:
            ckpt, hashed = open_checkpoint(at), []
            if variant == "ours-trusted":
                ckpt.trust()
            else:  # as a resume does: the job hashes every file once, each rank a share
                world = self.topo.layout.world_size
                choose(Found(str(at), [ckpt]), self.job, self.rank, world)
                hashed = sorted(ckpt.manifest["files"])[self.rank::world]
            load_checkpoint(ckpt, self.model, self.stepper, self.topo)
            files = ckpt.manifest["files"]
            opened = set(ckpt._files) | set(hashed)  # the files it read: its hash share, its pieces'
            return None, sum(files[name]["bytes"] for name in opened)

        def torch_load() -> tuple[dict, int]:
            path = at / self.file
            return torch.load(path, map_location="cpu", weights_only=True), path.stat().st_size

        def dcp_load() -> tuple[dict, int]:
            into = {f"{self.rank}/{k}": torch.zeros_like(v) for k, v in self.saved.items()}
            dcp.load(into, storage_reader=dcp.FileSystemReader(at))
            mine = at / f"__{self.rank}_0.distcp"  # FileSystemWriter's file for this rank
            return {k.split("/", 1)[1]: v for k, v in into.items()}, mine.stat().st_size

        return {"torch": torch_load, "dcp": dcp_load}.get(variant, ours)


def repetition(r: Rank, index: int, scratch: Path) -> dict:
    """Each variant saves, then loads warm and cold; in an order rotated by `index`."""
    out = {}
    for save in SAVES[index % len(SAVES):] + SAVES[:index % len(SAVES)]:
        folder = scratch / save
        if r.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        seconds, at = timed(r.saver(save, folder))
        rec = {"save_s": seconds, "bytes_written": sum(p.stat().st_size for p in files_in(folder)),
               "load": {}}
        if save == "ours":
            rec |= measure_apart(r, at, scratch)
        for name in LOADS[save]:
            rec["load"][name] = {}
            for cache in ("warm", "cold"):
                if r.rank == 0:
                    (evict if cache == "cold" else warm)(folder)
                dist.barrier()
                resident = resident_fraction(files_in(folder)) if r.rank == 0 else None
                if name.startswith("ours"):  # ours loads into the live model and optimizer
                    r.perturb()
                seconds, (got, nbytes) = timed(r.loader(name, at))
                check_equal(r.state() if got is None else got, r.saved, f"{name} load ({cache})")
                del got  # before the next load allocates its own
                rec["load"][name][cache] = {"s": seconds, "resident": resident}
                rec["load"][name]["bytes_read"] = nbytes
        out[save] = rec
        dist.barrier()
        if r.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    return out


def measure_apart(r: Rank, path: Path, scratch: Path) -> dict:
    """Steps of ours' save that torch.save lacks, timed alone: the finite check of every piece
    and the sha256 of each rank's file (ranks in parallel), and rank 0's commit of the same
    manifest into an empty directory (manifest.json, COMMIT, directory fsyncs, rename, latest)."""
    pieces = r.pieces()
    finite_s, _ = timed(lambda: non_finite(pieces))
    sha_s, _ = timed(lambda: sha256_file(path / f"shard_{r.rank:05d}.pt"))
    manifest = json.loads((path / "manifest.json").read_text())
    root = scratch / "commit_timed"

    def commit_again() -> None:
        if r.rank == 0:
            staging = root / f"{path.name}.partial"
            staging.mkdir(parents=True)
            commit(staging, root / path.name, manifest)
    commit_s, _ = timed(commit_again)
    if r.rank == 0:
        shutil.rmtree(root)
    return {"finite_s": finite_s, "sha256_s": sha_s, "commit_s": commit_s,
            "manifest_bytes": (path / "manifest.json").stat().st_size}


def worker(rank: int, world: int, overrides: list[str], reps: int, warmup: int, scratch: str) -> dict:
    """`warmup` repetitions first, reported apart: the first use of each code path and of the
    allocator's memory in a process costs more than the next (kept in the JSON, not in the medians)."""
    r = Rank(rank, overrides)
    state_bytes = sum(t.numel() * t.element_size() for t in r.saved.values())
    runs = [repetition(r, i, Path(scratch)) for i in range(warmup + reps)]
    return {"state_bytes": state_bytes, "warmup": runs[:warmup], "reps": runs[warmup:]}

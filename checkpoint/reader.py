"""Reading a committed checkpoint: open and check its structure, verify checksums, fetch any
block of any tensor (the pieces that intersect it, from whichever files hold them), and find
the checkpoint a spec names. No collectives (a job shares the checksum work:
checkpoint/select.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from checkpoint.errors import CheckpointError
from checkpoint.layout import Box, Shard, fill_box
from checkpoint.store import COMMIT, FORMAT, LATEST, MANIFEST, VERSION, committed, sha256_file


@dataclass
class Checkpoint:
    """A committed checkpoint opened for reading. `open_checkpoint` checks its structure
    (marker, manifest checksum, format, files present with their sizes, pieces tiling every
    tensor); file checksums are checked when a file is first read, or all by `verify()`."""

    path: Path
    manifest: dict[str, Any]
    _files: dict[str, dict] = field(default_factory=dict, repr=False)  # loaded shard files
    _verified: set[str] = field(default_factory=set, repr=False)  # files whose sha256 matched

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]

    @property
    def tensors(self) -> dict[str, dict]:
        return self.manifest["tensors"]

    def load_file(self, name: str) -> dict:
        """One shard file's tensors (memory-mapped), its checksum checked on first use."""
        if name not in self._files:
            path = self.path / name
            if name not in self._verified and (problem := self.check_file(name)):
                raise CheckpointError(problem)
            try:
                self._files[name] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error
                raise CheckpointError(f"checkpoint file {path} cannot be read: {exc}") from None
        return self._files[name]

    def verify(self) -> None:
        """Read every file and check its checksum."""
        for name in self.manifest["files"]:
            self.load_file(name)

    def check_file(self, name: str) -> str | None:
        """None if the file's sha256 matches the manifest, else what is wrong with it."""
        path = self.path / name
        try:
            digest = sha256_file(path)
        except OSError as exc:  # a problem like any other: callers share the verdicts
            return f"checkpoint file {path} cannot be read: {exc}"
        if digest != self.manifest["files"][name]["sha256"]:
            return f"checkpoint file {path} is corrupted: its sha256 does not match the manifest"
        self._verified.add(name)
        return None

    def check_share(self, part: int, parts: int) -> list[str]:
        """Check the checksums of files part, part + parts, ... (sorted by name): `parts`
        processes, one share each, read the checkpoint once between them. Returns the problems."""
        names = sorted(self.manifest["files"])[part::parts]
        return [p for p in map(self.check_file, names) if p]

    def trust(self) -> None:
        """Every file was checked (by the processes sharing the work): skip the checksum on load."""
        self._verified.update(self.manifest["files"])

    def fetch(self, name: str, target: Box, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The block `target` of global tensor `name` (None if the checkpoint lacks it)."""
        info = self.tensors.get(name)
        if info is None:
            return None
        dtype = dtype or getattr(torch, info["dtype"])
        by_box: dict[Box, list] = {}
        for piece in info["pieces"]:
            box = Box.from_json(piece["box"])
            if box.intersect(target) is not None:
                by_box.setdefault(box, []).append(piece)
        pieces = []
        for box, frags in by_box.items():  # fragments of one box: concatenate in flat order
            frags.sort(key=lambda f: f["flat"][0])
            flat = torch.cat([self.load_file(f["file"])[f["key"]].reshape(-1) for f in frags])
            pieces.append((box, flat.view(box.sizes)))
        out = fill_box(target, pieces, dtype)
        if out is None:
            raise CheckpointError(f"{self.path}: tensor {name} does not cover block {target}")
        return out

    def full(self, name: str) -> torch.Tensor:
        return self.fetch(name, Box.whole(self.tensors[name]["shape"]))


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


def stored_names(ckpt: Checkpoint, prefix: str) -> set[str]:
    return {n.split("/", 1)[1] for n in ckpt.tensors if n.startswith(f"{prefix}/")}


def _check_tiling(path: Path, name: str, info: dict) -> None:
    """The boxes of a tensor tile its global shape and the fragments of each box tile the box
    (counted by elements; writers are unique by construction, see parallel/shards.py)."""
    total, per_box = 0, {}
    for piece in info["pieces"]:
        box = Box.from_json(piece["box"])
        lo, hi = piece["flat"]
        per_box.setdefault(box, 0)
        per_box[box] += hi - lo
    whole = Box.whole(info["shape"]).numel
    for box, n in per_box.items():
        if n != box.numel:
            raise CheckpointError(f"{path}: tensor {name} block {box.to_json()} has {n} of "
                                  f"{box.numel} elements")
        total += n
    if total != whole:
        raise CheckpointError(f"{path}: tensor {name} has {total} of {whole} elements")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open and structurally check a checkpoint directory; errors name the file at fault."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a directory)")
    marker, man = path / COMMIT, path / MANIFEST
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path} has no {COMMIT} marker: it was never "
                              "completed (interrupted save?)")
    if not man.is_file():
        raise CheckpointError(f"checkpoint {path}: {man} is missing")
    data = man.read_bytes()
    if hashlib.sha256(data).hexdigest() != marker.read_text().strip():
        raise CheckpointError(f"checkpoint {path}: {man} does not match the checksum in {marker}")
    manifest = json.loads(data)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')} version "
                              f"{manifest.get('version')}, this code reads {FORMAT} {VERSION}")
    for name, rec in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != rec["bytes"]:
            raise CheckpointError(f"checkpoint file {f} has {f.stat().st_size} bytes, the "
                                  f"manifest says {rec['bytes']} (truncated or replaced)")
    for name, info in manifest["tensors"].items():
        _check_tiling(path, name, info)
    return Checkpoint(path, manifest)


def skipped_message(path: Path, problems: list) -> str:
    """What resume=auto says about a candidate it passes over: the first problem, and how many
    more there are."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"skipping broken checkpoint {path}: {problems[0]}{more}"


def candidates(root: Path) -> tuple[list[Checkpoint], list[str]]:
    """The committed checkpoints under `root` that open (structure checked, file checksums
    not yet), newest first, and messages about those that do not."""
    found, skipped = [], []
    for path in committed(root):
        try:
            found.append(open_checkpoint(path))
        except CheckpointError as exc:
            skipped.append(skipped_message(path, [exc]))
    return found, skipped


def resolve(spec: str, root: Path) -> tuple[Checkpoint | None, list[str]]:
    """`spec` is a checkpoint directory, its parent (`latest` or newest inside), or "auto"
    (newest committed one under `root` that opens and verifies; None when there is none).
    Returns the checkpoint and messages about those skipped. One process reads every file of
    an "auto" candidate; a job shares that work (launcher.train.choose_verified)."""
    if spec != "auto":
        path = Path(spec)
        if path.is_dir() and not (path / MANIFEST).exists() and not (path / COMMIT).exists():
            latest = path / LATEST  # a checkpoints folder: its latest, else its newest
            named = path / latest.read_text().strip() if latest.is_file() else None
            inside = [named] if named and (named / COMMIT).is_file() else committed(path)
            if not inside and not any(path.glob("shard_*.pt")):
                raise CheckpointError(f"{path} holds no committed checkpoint")
            path = inside[0] if inside else path
        return open_checkpoint(path), []
    found, skipped = candidates(root)
    for ckpt in found:
        problems = ckpt.check_share(0, 1)
        if not problems:
            return ckpt, skipped
        skipped.append(skipped_message(ckpt.path, problems))
    return None, skipped

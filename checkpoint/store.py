"""Checkpoint files on disk: shard files, the manifest, the commit marker, `latest`, retention.
No collectives: usable from one process (the inspect CLI, tests) as well as from every rank of
a job (checkpoint/save.py). Reading is checkpoint/reader.py.

A committed checkpoint is a directory

    step_00000200/
        shard_00000.pt ... shard_NNNNN.pt   torch.save of {key: 1-D or box-shaped tensor}, one
                                             per writing rank, each holding the pieces it owns
        manifest.json                        every tensor: global shape, dtype, pieces (box,
                                             flat range, file, key); every file: bytes, sha256;
                                             step, layout, config, data and RNG state
        COMMIT                               written last; holds the manifest's sha256

It is written as `step_00000200.partial/` and renamed once COMMIT is in it, so a checkpoint
directory without `.partial` is complete; `latest` (a file holding the name) moves after the
rename. Shard files are named by the writing rank only for uniqueness: their content is
addressed by global boxes, so any layout reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

FORMAT = "moe-train/sharded"
VERSION = 1
MANIFEST, COMMIT, LATEST = "manifest.json", "COMMIT", "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary name, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _HashingWriter:
    """A file as torch.save sees it, hashing the bytes on their way out: torch.save writes a
    file object front to back (no seek), so this is the file's sha256 without reading it again."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.sha.update(data)
        self.bytes += len(data)
        return n

    def flush(self) -> None:
        self.f.flush()


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write one rank's pieces atomically; returns its manifest record (bytes, sha256)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        out = _HashingWriter(f)
        torch.save({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, out)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if path.stat().st_size != out.bytes:  # the invariant above, checked where it is cheap
        raise OSError(f"{path}: {path.stat().st_size} bytes on disk, {out.bytes} written")
    return {"bytes": out.bytes, "sha256": out.sha.hexdigest()}


def commit(staging: Path, final: Path, manifest: dict[str, Any]) -> list[str]:
    """Manifest, then COMMIT, then the directory rename, then `latest`. A crash at any point
    leaves either no new checkpoint or a complete one. Checkpoints of later steps are set
    aside first (see set_aside_later); returns what was set aside, as messages."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    write_atomic(staging / MANIFEST, data)
    write_atomic(staging / COMMIT, hashlib.sha256(data).hexdigest().encode())
    _fsync_dir(staging)
    if final.exists():  # the same step saved again (a rerun into the same run dir)
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    notes = set_aside_later(final.parent, manifest["step"])
    _fsync_dir(final.parent)
    write_atomic(final.parent / LATEST, final.name.encode())
    return notes


def set_aside_later(root: Path, step: int) -> list[str]:
    """Saving step N where later steps are committed rewrites the run's history: it resumed
    from an older checkpoint (a rollback) or restarted into the same run dir. The later
    checkpoints belong to the abandoned line; left in place, retention would prune the new
    line's saves first (keep_last 1 deleted each new save at once) and resume=auto would go
    back to the abandoned line. They are renamed, not deleted (step_M.superseded-by-N), so
    nothing is lost and nothing reads them as checkpoints of this run."""
    notes = []
    for path in committed(root):  # newest step first
        later = int(_STEP_DIR.match(path.name).group(1))
        if later <= step:
            break
        aside = base = path.with_name(f"{path.name}.superseded-by-{step}")
        n = 1
        while aside.exists():  # the same rollback twice
            aside, n = base.with_name(f"{base.name}.{n}"), n + 1
        os.replace(path, aside)
        notes.append(f"checkpoint {path.name} is later than step {step}, which was just saved: "
                     f"set aside as {aside.name}")
    return notes


def committed(root: Path) -> list[Path]:
    """Committed checkpoint directories under `root`, newest step first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / COMMIT).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found, reverse=True)]


def _finite(path: Path) -> bool:
    """Whether the checkpoint's manifest says save checked every tensor finite (older
    checkpoints did not say)."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("finite") is True
    except (OSError, ValueError):
        return False


def retain(root: Path, keep_last: int, protect: Path | None = None) -> list[str]:
    """Delete committed checkpoints beyond the newest `keep_last` (0 keeps all). Never the
    newest, never the newest one known to be finite, never `protect` (the checkpoint the run
    resumed from: a run that diverges after resuming, its losses huge but finite, must not
    delete the state it started from), whatever keep_last says. Never raises: returns
    warnings for what could not be deleted."""
    warnings = []
    found = committed(root)
    keep = {p.resolve() for p in (next((p for p in found if _finite(p)), None), protect) if p}
    for old in found[max(keep_last, 1):] if keep_last else []:
        if old.resolve() in keep:
            continue
        try:
            # Un-commit first, so a half-deleted directory can never pass for a checkpoint.
            os.remove(old / COMMIT)
            shutil.rmtree(old)
        except OSError as exc:
            warnings.append(f"could not delete old checkpoint {old}: {exc}")
    return warnings

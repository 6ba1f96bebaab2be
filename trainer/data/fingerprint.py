"""What a run's data was, cheaply: every file's size and a hash of sampled blocks.

A fingerprint is JSON: {"version": 1, "roots": [{"path": ..., "files": {rel: [size, hash]}}]}.
A file up to WHOLE_BYTES is hashed whole; a larger one through SAMPLES blocks of SAMPLE_BYTES
spread evenly from its first byte to its last, so a multi-GB shard costs about a megabyte of
reads. A change outside the sampled blocks that keeps the size goes unnoticed; a prepared
dataset's meta.json (one of its files, hashed whole) carries each shard's full sha256, so
preparing it again is always seen. Roots are compared by position and files by relative
name: a dataset moved elsewhere unchanged is the same data.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

VERSION = 1
WHOLE_BYTES = 1 << 20
SAMPLES, SAMPLE_BYTES = 16, 1 << 16
_SHOWN = 5  # differences named in a message


def file_digest(path: Path, size: int) -> str:
    """16 hex digits of sha256 over the file (small) or its sampled blocks (large)."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= WHOLE_BYTES:
            digest.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLES - 1)
            for i in range(SAMPLES):
                f.seek(round(i * step))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def fingerprint_files(roots: list[tuple[Path, list[str]]]) -> dict:
    """The fingerprint of files given as (root, [relative names]) pairs."""
    out = []
    for root, rels in roots:
        files = {}
        for rel in rels:
            size = os.stat(Path(root, rel)).st_size
            files[rel] = [size, file_digest(Path(root, rel), size)]
        out.append({"path": str(root), "files": files})
    return {"version": VERSION, "roots": out}


def fingerprint_change(saved: dict | None, current: dict) -> str | None:
    """None when `current` reads the same data as `saved` (None: nothing recorded, no
    check); else what changed, naming the files (the first few, and how many in all)."""
    if not saved:
        return None
    if saved.get("version") != current.get("version"):
        return (f"the data fingerprint has version {saved.get('version')} in the checkpoint and "
                f"{current.get('version')} here: they cannot be compared")
    old, new = saved["roots"], current["roots"]
    if len(old) != len(new):
        return (f"the run read {len(old)} data location(s) ({', '.join(r['path'] for r in old)}), "
                f"this one reads {len(new)} ({', '.join(r['path'] for r in new)})")
    changes = []
    for was, now in zip(old, new):
        a, b = was["files"], now["files"]
        root = Path(now["path"])
        for rel in sorted(set(a) | set(b)):
            if rel not in b:
                changes.append(f"{Path(was['path'], rel)} is gone")
            elif rel not in a:
                changes.append(f"{root / rel} is new")
            elif a[rel][0] != b[rel][0]:
                changes.append(f"{root / rel} has {b[rel][0]} bytes, {a[rel][0]} before")
            elif a[rel][1] != b[rel][1]:
                changes.append(f"{root / rel} has other content (same size, sampled hash differs)")
    if not changes:
        return None
    more = f"; and {len(changes) - _SHOWN} more" if len(changes) > _SHOWN else ""
    return f"the data changed in {len(changes)} file(s): " + "; ".join(changes[:_SHOWN]) + more

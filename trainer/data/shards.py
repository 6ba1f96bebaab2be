"""The on-disk format of a prepared dataset, and writing it atomically.

    DIR/plan.json         what is being prepared (inputs, options, tokenizer): written first
    DIR/tokenizer.json    the tokenizer (copied, or trained here)
    DIR/train-00012.bin   unit 12's training tokens: documents, each followed by EOS
    DIR/val-00012.bin     its held-out tokens (absent when it has none)
    DIR/shard-00012.json  unit 12's record: per split documents, tokens, UTF-8 bytes, sha256, max id
    DIR/meta.json         written last: the dataset is complete

Every file is written under a temporary name and renamed into place, and a unit's record
only after its token files: a record marks a finished unit, so a killed run restarted
never takes a half-written shard for a finished one. No torch here (the workers import it).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT, VERSION = "moe-train-prepared", 1
META, PLAN = "meta.json", "plan.json"
SPLITS = ("train", "val")
_TMP = ".tmp-"


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def record_file(index: int) -> str:
    return f"shard-{index:05d}.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}{_TMP}{os.getpid()}")


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (a temporary file, fsync, rename)."""
    tmp = _tmp(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_partial(directory: Path) -> list[str]:
    """Delete what a killed run left under temporary names; returns their names."""
    gone = [p for p in directory.iterdir() if _TMP in p.name]
    for p in gone:
        p.unlink()
    return [p.name for p in gone]


class ShardWriter:
    """Streams token ids to a temporary file, hashing as it goes; commit() renames it into
    place (or writes nothing when no token came)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self._tmp = path, dtype, _tmp(path)
        self._file = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self.tokens, self.max_id = 0, -1

    def write(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        data = ids.astype(self.dtype).tobytes()
        self._file.write(data)
        self._sha.update(data)
        self.tokens += len(ids)
        self.max_id = max(self.max_id, int(ids.max()))

    def commit(self) -> dict:
        """{file, tokens, sha256, max_id}; file is None when the shard holds no token."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if not self.tokens:
            self._tmp.unlink()
            return {"file": None, "tokens": 0, "sha256": None, "max_id": None}
        os.replace(self._tmp, self.path)
        return {"file": self.path.name, "tokens": self.tokens, "sha256": self._sha.hexdigest(),
                "max_id": self.max_id}

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

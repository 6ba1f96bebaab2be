"""Reading a dataset written by `moe-prepare-data` (layout: trainer/data/shards.py).

Each split's shards are read as one token array (ConcatTokens over numpy memmaps): nothing
is loaded until a window is read, so a dataset far larger than memory costs only its pages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import DataError
from trainer.data.shards import FORMAT, META, SPLITS, VERSION
from trainer.data.tokenizer import TokenizerInfo


class ConcatTokens:
    """Several 1-D token arrays read as one: len, dtype, ndim, slices and integer-array
    indexing (what ShardedSampler reads windows with). Each array's name and largest id come
    from the metadata, so checking ids against a vocabulary reads no token."""

    ndim = 1

    def __init__(self, arrays: list[np.ndarray], dtype: np.dtype, names: list[str], maxima: list[int]):
        self.arrays, self.dtype, self.names, self.maxima = arrays, np.dtype(dtype), names, maxima
        self.max_id = max(maxima, default=-1)
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # (n_arrays + 1,)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(*index.indices(len(self))))
        return self.take(np.asarray(index))

    def take(self, index: np.ndarray) -> np.ndarray:
        flat = index.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"index out of range [0, {len(self)})")
        which = np.searchsorted(self._starts, flat, side="right") - 1  # the array each index is in
        out = np.empty(flat.shape, dtype=self.dtype)
        for a in np.unique(which):
            mask = which == a
            out[mask] = self.arrays[a][flat[mask] - self._starts[a]]
        return out.reshape(index.shape)

    def min(self) -> int:
        return 0  # unsigned ids

    def max(self) -> int:
        return self.max_id


@dataclass(frozen=True, eq=False)
class PreparedDataset:
    path: Path
    meta: dict
    tokenizer: TokenizerInfo
    train: ConcatTokens
    val: ConcatTokens
    files: list[str]
    """Every file the run reads, relative to `path` (what the fingerprint covers)."""

    def bytes_per_token(self, split: str) -> float | None:
        """UTF-8 bytes of the split's documents per token (EOS included): bits per byte =
        token loss / ln 2 / this."""
        tokens = self.meta[split]["tokens"]
        return self.meta[split]["bytes"] / tokens if tokens else None


def _open_split(path: Path, meta: dict, split: str, dtype: np.dtype) -> tuple[ConcatTokens, list[str]]:
    arrays, names, maxima = [], [], []
    for shard in meta["shards"]:
        entry = shard[split]
        if entry["file"] is None:
            continue
        file = path / entry["file"]
        expected = entry["tokens"] * dtype.itemsize
        size = file.stat().st_size if file.is_file() else None
        if size != expected:
            raise DataError(f"prepared dataset {path}: {file.name} "
                              + ("is missing" if size is None else f"has {size} bytes, its record says {expected}")
                              + "; prepare the dataset again")
        arrays.append(np.memmap(file, dtype=dtype, mode="r"))
        names.append(entry["file"])
        maxima.append(entry["max_id"])
    return ConcatTokens(arrays, dtype, names, maxima), names


def load_prepared(path: str | Path) -> PreparedDataset:
    """Open a prepared dataset, checking its metadata and every shard's size (not its sha256:
    that would read the whole dataset on every rank)."""
    path = Path(path)
    if not (path / META).is_file():
        raise DataError(
            f"{path} is not a prepared dataset (no {META}): prepare it with moe-prepare-data; if a "
            "preparation was stopped there, run the same command again to finish it")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{path}/{META}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                          f"expected {FORMAT!r} version {VERSION}")
    dtype = np.dtype(meta["dtype"])
    (train, train_files), (val, val_files) = (_open_split(path, meta, s, dtype) for s in SPLITS)
    return PreparedDataset(path, meta, TokenizerInfo.from_json(meta["tokenizer"]), train, val,
                           [META, *train_files, *val_files])

"""Corpora: a data source split into train and held-out tokens.

Pure data logic (no torch.distributed): every dp rank builds the same corpus and the same
global stream of samples (trainer/data/sampler.py), then takes its own disjoint slice of it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from model.errors import ConfigError, DataError
from trainer.config import DataConfig
from trainer.data.fingerprint import fingerprint_change, fingerprint_files
from trainer.data.inputs import stdlib_files, stdlib_root
from trainer.data.mixture import Mixture
from trainer.data.prepared import load_prepared
from trainer.data.split import is_held_out
from trainer.data.tokenizer import RAW_BYTES, TokenizerInfo, load_tokenizer


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field-wise makes no sense
class Corpus:
    """Train and held-out tokens: a 1-D uint8 tensor for bytes, a numpy memmap for a token
    file, a prepared dataset's shards (ConcatTokens), or a Mixture of several datasets."""

    train: torch.Tensor | np.ndarray | Mixture
    val: torch.Tensor | np.ndarray | Mixture
    description: str
    vocab_size: int | None  # 256 for byte sources; None when a token file does not say
    tokenizer: TokenizerInfo | None = None
    """Identity of the ids (None: a token file does not say). A checkpoint can record it and
    compare it with a model's."""
    val_bytes_per_token: float | None = None
    """UTF-8 bytes per held-out token (1 for bytes), for bits per byte; a Mixture carries one per dataset."""
    files: tuple[tuple[Path, tuple[str, ...]], ...] = ()
    """(root, relative names): every file the corpus was read from, for the fingerprint."""
    hint: str = ""
    """Added to a too-little-data error: how to get more data."""

    num_train_tokens = property(lambda self: len(self.train))
    num_val_tokens = property(lambda self: len(self.val))

    @cached_property
    def fingerprint(self) -> dict:
        """Sizes and sampled hashes of the corpus's files (JSON; trainer/data/fingerprint.py):
        compare two with fingerprint_change. Computed on first use."""
        return fingerprint_files([(root, list(rels)) for root, rels in self.files])

    def changed_since(self, saved: dict | None) -> str | None:
        """What changed since the data had the fingerprint `saved` (None: nothing, or no
        fingerprint was saved)."""
        return None if saved is None else fingerprint_change(saved, self.fingerprint)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 100_000 else f"{num_bytes} bytes"


def _bytes_tensor(buf: bytearray) -> torch.Tensor:
    # frombuffer shares the bytearray's memory: no extra copy of the corpus.
    return torch.frombuffer(buf, dtype=torch.uint8)


def _bytes_corpus(train, val, desc: str, root: Path, rels, hint: str = "") -> Corpus:
    return Corpus(train, val, desc, 256, RAW_BYTES, 1.0, ((root, tuple(rels)),), hint)


def _read_split(root: Path, rel_paths: list[str], fraction: float):
    """Concatenate files (sorted, joined by b"\\n") into train/val buffers, split by file."""
    bufs = {False: bytearray(), True: bytearray()}
    counts = {False: 0, True: 0}
    for rel in rel_paths:
        held = is_held_out(rel, fraction)
        if bufs[held]:
            bufs[held] += b"\n"
        bufs[held] += (root / rel).read_bytes()
        counts[held] += 1
    return bufs[False], bufs[True], counts[False], counts[True]


def _load_stdlib(cfg: DataConfig) -> Corpus:
    root, rel_paths = stdlib_root(), [rel for _, rel in stdlib_files()]
    train, val, n_train, n_val = _read_split(root, rel_paths, cfg.holdout_fraction)
    if not train or not val:
        raise DataError(
            f"stdlib at {root}: split left {n_train} train files ({len(train)} bytes) and "
            f"{n_val} held-out files ({len(val)} bytes); both must be non-empty"
        )
    desc = (f"stdlib of {root}: {n_train} files, {_size(len(train))}; "
            f"held out {n_val} files, {_size(len(val))}")
    return _bytes_corpus(_bytes_tensor(train), _bytes_tensor(val), desc, root, rel_paths)


def _tail_split(buf: bytearray, fraction: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out the last `fraction` of the bytes (views of one tensor, no copy)."""
    n_val = max(1, int(len(buf) * fraction))
    if len(buf) - n_val < 1:
        raise DataError(f"{what}: {len(buf)} bytes is too little to hold out {fraction}")
    tokens = _bytes_tensor(buf)
    return tokens[: len(buf) - n_val], tokens[len(buf) - n_val :]


def _glob_report(path: Path, glob: str, matched: list[str]) -> str:
    """How many files data.text_glob matched, what else the folder holds, and the fix."""
    matched_set = set(matched)
    others = sorted(rel for rel in (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
                    if rel not in matched_set)
    report = f"{len(matched)} file(s) in data.path ({path}) match data.text_glob ({glob!r})"
    if not others:
        return report
    suffix = Counter(Path(o).suffix for o in others).most_common(1)[0][0]
    return (f"{report}; {len(others)} other file(s) do not (e.g. {', '.join(others[:3])}): to read "
            f"them set data.text_glob, e.g. --data.text_glob='**/*{suffix}' or '**/*'")


def _load_text(cfg: DataConfig) -> Corpus:
    path = Path(cfg.path)
    if path.is_file():
        buf = bytearray(path.read_bytes())
        if not buf:
            raise DataError(f"data.path ({path}) is empty")
        train, val = _tail_split(buf, cfg.holdout_fraction, str(path))
        desc = f"text file {path}: {_size(len(train))}; held out the last {_size(len(val))}"
        return _bytes_corpus(train, val, desc, path.parent, [path.name])
    rel_paths = sorted({p.relative_to(path).as_posix() for p in path.glob(cfg.text_glob)
                        if p.is_file()})
    train_buf, val_buf, n_train, n_val = _read_split(path, rel_paths, cfg.holdout_fraction)
    if not train_buf and not val_buf:
        raise DataError(f"no data: the {len(rel_paths)} file(s) in data.path ({path}) matching data.text_glob "
                          f"({cfg.text_glob!r}) are all empty" if rel_paths else
                          f"no data: {_glob_report(path, cfg.text_glob, rel_paths)}")
    hint = f"; {_glob_report(path, cfg.text_glob, rel_paths)}"
    if len(rel_paths) >= 2 and train_buf and val_buf:
        desc = (f"text of {path} ({cfg.text_glob}): {n_train} files, {_size(len(train_buf))}; "
                f"held out {n_val} files, {_size(len(val_buf))}")
        return _bytes_corpus(_bytes_tensor(train_buf), _bytes_tensor(val_buf), desc, path, rel_paths, hint)
    # Degenerate split: one buffer holds every file in sorted order; hold out its tail.
    whole = train_buf or val_buf
    train, val = _tail_split(whole, cfg.holdout_fraction, f"{path} ({cfg.text_glob})")
    desc = (f"text of {path} ({cfg.text_glob}): {len(rel_paths)} files, {_size(len(train))}; "
            f"held out the last {_size(len(val))}")
    return _bytes_corpus(train, val, desc, path, rel_paths, hint)


def _load_tokens(cfg: DataConfig) -> Corpus:
    path, dtype = Path(cfg.path), np.dtype(cfg.token_dtype)
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise DataError(
            f"token file {path} has {size} bytes, not a positive multiple of "
            f"{dtype.itemsize} (the size of data.token_dtype {cfg.token_dtype})"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r")  # (N,), read lazily from disk
    n = len(tokens)
    n_val = max(1, int(n * cfg.holdout_fraction))
    if n - n_val < 1:
        raise DataError(f"token file {path}: {n} tokens is too few to hold out any")
    desc = f"tokens of {path} ({dtype}): {n - n_val} tokens; held out the last {n_val}"
    return Corpus(tokens[: n - n_val], tokens[n - n_val :], desc, None,
                  files=((path.parent, (path.name,)),))


def _load_prepared(cfg: DataConfig) -> Corpus:
    """One prepared dataset, or a mixture of several by data.weights; they must share one
    tokenizer, and it must be data.tokenizer's when that is set."""
    datasets = [load_prepared(p) for p in cfg.paths()]
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.tokenizer != first.tokenizer:
            raise DataError(f"data.path: {ds.path} was prepared with another tokenizer "
                              f"({ds.tokenizer.describe()}) than {first.path} ({first.tokenizer.describe()}); "
                              "the datasets of a mixture must share one")
    if cfg.tokenizer is not None:
        expected = load_tokenizer(cfg.tokenizer).info
        for ds in datasets:
            if ds.tokenizer != expected:
                raise DataError(f"{ds.path} was prepared with another tokenizer ({ds.tokenizer.describe()}) "
                                  f"than data.tokenizer {cfg.tokenizer} ({expected.describe()})")
    for ds in datasets:
        if not len(ds.val):
            raise DataError(f"prepared dataset {ds.path} holds no held-out tokens (prepared with "
                              f"--holdout-fraction {ds.meta['holdout_fraction']}): evaluation needs some")
    files = tuple((ds.path, tuple(ds.files)) for ds in datasets)
    parts = ", ".join(f"{ds.path} ({ds.meta['train']['tokens']:,} train / {ds.meta['val']['tokens']:,} "
                      f"held-out tokens)" for ds in datasets)
    if len(datasets) == 1:
        return Corpus(first.train, first.val, f"prepared {parts}; {first.tokenizer.describe()}",
                      first.tokenizer.vocab_size, first.tokenizer, first.bytes_per_token("val"), files)
    weights, names = cfg.mixture_weights(), [str(ds.path) for ds in datasets]
    train = Mixture([ds.train for ds in datasets], weights, names, [ds.bytes_per_token("train") for ds in datasets])
    val = Mixture([ds.val for ds in datasets], weights, names, [ds.bytes_per_token("val") for ds in datasets])
    desc = f"mixture of prepared {parts} with weights {weights}; {first.tokenizer.describe()}"
    return Corpus(train, val, desc, first.tokenizer.vocab_size, first.tokenizer, None, files)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load the configured source and split it into train and held-out tokens."""
    loaders = {"stdlib": _load_stdlib, "text": _load_text, "tokens": _load_tokens, "prepared": _load_prepared}
    if cfg.source not in loaders:
        raise ConfigError(f"data.source ({cfg.source!r}) must be one of: {', '.join(loaders)}")
    return loaders[cfg.source](cfg)

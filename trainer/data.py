"""Token data for LM training: corpora, a resumable sharded sampler, and eval batches.

Pure data logic (no torch.distributed): every dp rank builds the same corpus and the same
global stream of samples, then takes its own disjoint slice of it. The stream position is one
number, the global samples seen, so resuming a run (at any dp) only needs that count.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.errors import ConfigError
from trainer.config import DataConfig, TrainConfig

_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field-wise makes no sense
class Corpus:
    """Train and held-out tokens (1-D uint8 tensor for bytes, numpy memmap for token files)."""

    train: torch.Tensor | np.ndarray
    val: torch.Tensor | np.ndarray
    description: str
    vocab_size: int | None  # 256 for byte sources; None when a token file does not say

    num_train_tokens = property(lambda self: len(self.train))
    num_val_tokens = property(lambda self: len(self.val))


def is_held_out(rel_path: str, holdout_fraction: float) -> bool:
    """Whether a file (by its relative posix path) goes to the held-out set.

    A stable hash (sha1, not the salted built-in hash()) so every rank and every run agrees,
    and adding or removing one file does not move any other file between the splits.
    """
    bucket = int.from_bytes(hashlib.sha1(rel_path.encode("utf-8")).digest()[:8], "big")
    return bucket % 10_000 < holdout_fraction * 10_000


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 100_000 else f"{num_bytes} bytes"


def _bytes_tensor(buf: bytearray) -> torch.Tensor:
    # frombuffer shares the bytearray's memory: no extra copy of the corpus.
    return torch.frombuffer(buf, dtype=torch.uint8)


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
    root = Path(sysconfig.get_paths()["stdlib"])
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune, don't descend
        rel_dir = Path(dirpath).relative_to(root)
        rel_paths += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    rel_paths.sort()
    train, val, n_train, n_val = _read_split(root, rel_paths, cfg.holdout_fraction)
    if not train or not val:
        raise ConfigError(
            f"stdlib at {root}: split left {n_train} train files ({len(train)} bytes) and "
            f"{n_val} held-out files ({len(val)} bytes); both must be non-empty"
        )
    desc = (f"stdlib of {root}: {n_train} files, {_size(len(train))}; "
            f"held out {n_val} files, {_size(len(val))}")
    return Corpus(_bytes_tensor(train), _bytes_tensor(val), desc, 256)


def _tail_split(buf: bytearray, fraction: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out the last `fraction` of the bytes (views of one tensor, no copy)."""
    n_val = max(1, int(len(buf) * fraction))
    if len(buf) - n_val < 1:
        raise ConfigError(f"{what}: {len(buf)} bytes is too little to hold out {fraction}")
    tokens = _bytes_tensor(buf)
    return tokens[: len(buf) - n_val], tokens[len(buf) - n_val :]


def _load_text(cfg: DataConfig) -> Corpus:
    path = Path(cfg.path)
    if path.is_file():
        buf = bytearray(path.read_bytes())
        if not buf:
            raise ConfigError(f"data.path ({path}) is empty")
        train, val = _tail_split(buf, cfg.holdout_fraction, str(path))
        desc = f"text file {path}: {_size(len(train))}; held out the last {_size(len(val))}"
        return Corpus(train, val, desc, 256)
    rel_paths = sorted({p.relative_to(path).as_posix() for p in path.glob(cfg.text_glob)
                        if p.is_file()})
    train_buf, val_buf, n_train, n_val = _read_split(path, rel_paths, cfg.holdout_fraction)
    if not train_buf and not val_buf:
        raise ConfigError(
            f"no data in data.path ({path}) matching data.text_glob ({cfg.text_glob!r}): "
            f"{len(rel_paths)} files, all empty"
        )
    if len(rel_paths) >= 2 and train_buf and val_buf:
        desc = (f"text of {path} ({cfg.text_glob}): {n_train} files, {_size(len(train_buf))}; "
                f"held out {n_val} files, {_size(len(val_buf))}")
        return Corpus(_bytes_tensor(train_buf), _bytes_tensor(val_buf), desc, 256)
    # Degenerate split: one buffer holds every file in sorted order; hold out its tail.
    whole = train_buf or val_buf
    train, val = _tail_split(whole, cfg.holdout_fraction, f"{path} ({cfg.text_glob})")
    desc = (f"text of {path} ({cfg.text_glob}): {len(rel_paths)} files, {_size(len(train))}; "
            f"held out the last {_size(len(val))}")
    return Corpus(train, val, desc, 256)


def _load_tokens(cfg: DataConfig) -> Corpus:
    path, dtype = Path(cfg.path), np.dtype(cfg.token_dtype)
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise ConfigError(
            f"token file {path} has {size} bytes, not a positive multiple of "
            f"{dtype.itemsize} (the size of data.token_dtype {cfg.token_dtype})"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r")  # (N,), read lazily from disk
    n = len(tokens)
    n_val = max(1, int(n * cfg.holdout_fraction))
    if n - n_val < 1:
        raise ConfigError(f"token file {path}: {n} tokens is too few to hold out any")
    desc = f"tokens of {path} ({dtype}): {n - n_val} tokens; held out the last {n_val}"
    return Corpus(tokens[: n - n_val], tokens[n - n_val :], desc, None)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load the configured source and split it into train and held-out tokens."""
    loaders = {"stdlib": _load_stdlib, "text": _load_text, "tokens": _load_tokens}
    if cfg.source not in loaders:
        raise ConfigError(f"data.source ({cfg.source!r}) must be one of: {', '.join(loaders)}")
    return loaders[cfg.source](cfg)


class ShardedSampler:
    """Non-overlapping windows of `seq_len + 1` tokens, shuffled per epoch, split over dp ranks.

    Global sample g is window perm_epoch[g % num_samples], epoch = g // num_samples, and
    micro-step m on rank r takes g = (m * dp_size + r) * micro_batch_size + j. So all ranks
    together read one contiguous, disjoint block of the stream per micro-step, and the data
    position is one number, the global samples seen: a resumed run continues at the first
    unseen sample even when dp or the batch size changed (`batch_at`).
    """

    def __init__(self, tokens, seq_len: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, shuffle: bool = True,
                 vocab_size: int | None = None, what: str = "data") -> None:
        if seq_len < 1 or micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler shape: seq_len={seq_len}, micro_batch_size="
                             f"{micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        is_torch = isinstance(tokens, torch.Tensor)
        integer = (not tokens.dtype.is_floating_point and not tokens.dtype.is_complex
                   if is_torch else np.issubdtype(tokens.dtype, np.integer))
        if tokens.ndim != 1 or not integer:
            raise ValueError(f"tokens must be a 1-D integer array, got ndim={tokens.ndim}, "
                             f"dtype={tokens.dtype}")
        self.tokens, self._is_torch = tokens, is_torch
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.vocab_size = seed, shuffle, vocab_size
        self.num_samples = (len(tokens) - 1) // seq_len
        needed = micro_batch_size * dp_size
        if self.num_samples < needed:
            raise ConfigError(
                f"{what}: {len(tokens)} tokens give {self.num_samples} windows of seq_len "
                f"{seq_len}, fewer than micro_batch_size * dp_size = {needed} needed per step"
            )
        self._offsets = torch.arange(seq_len + 1)  # (L+1,)
        self._perm_epoch, self._perm = -1, None  # cache of the current epoch's permutation

    def _sample(self, g: int) -> int:
        epoch, pos = divmod(g, self.num_samples)
        if not self.shuffle:
            return pos
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_samples, generator=gen), epoch
        return int(self._perm[pos])

    def batch(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 (micro_batch_size, seq_len); targets shifted by one."""
        if micro_step < 0:
            raise ValueError(f"micro_step ({micro_step}) must be >= 0")
        return self.batch_at(micro_step * self.dp_size * self.micro_batch_size)

    def batch_at(self, first_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch of the micro-step whose global samples start at `first_sample`:
        samples first_sample + dp_rank * micro_batch_size + j. The data position of a run is
        therefore one number, the global samples seen, whatever dp was."""
        if first_sample < 0:
            raise ValueError(f"first_sample ({first_sample}) must be >= 0")
        base = first_sample + self.dp_rank * self.micro_batch_size
        samples = [self._sample(base + j) for j in range(self.micro_batch_size)]
        idx = torch.tensor(samples)[:, None] * self.seq_len + self._offsets  # (B, L+1)
        if self._is_torch:
            windows = self.tokens[idx].long()  # (B, L+1)
        else:  # fancy indexing reads only these windows from the memmap
            windows = torch.from_numpy(np.asarray(self.tokens[idx.numpy()], dtype=np.int64))
        if self.vocab_size is not None:  # cheap per batch; token files can hold anything
            lo, hi = int(windows.min()), int(windows.max())
            if hi >= self.vocab_size or lo < 0:
                raise ConfigError(f"token {hi if hi >= self.vocab_size else lo} in the batch at "
                                  f"global sample {base} is outside [0, vocab_size={self.vocab_size})")
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_batches(tokens, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_batches: int, vocab_size: int | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's `num_batches` held-out batches: the first windows in order, no shuffle.

    The stream cycles when the held-out set is small, so every rank runs exactly
    `num_batches` forward passes (the model's collectives need all ranks in step).
    """
    if num_batches < 1:
        raise ValueError(f"num_batches ({num_batches}) must be >= 1")
    sampler = ShardedSampler(tokens, seq_len, micro_batch_size, dp_rank, dp_size, seed=0,
                             shuffle=False, vocab_size=vocab_size, what="held-out data")
    return [sampler.batch(m) for m in range(num_batches)]


@dataclass(frozen=True, eq=False)
class RankData:
    """What one dp rank reads: its training sampler and its fixed held-out batches."""

    sampler: ShardedSampler
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]


def rank_data(corpus: Corpus, train: TrainConfig, vocab_size: int, dp_rank: int, dp_size: int) -> RankData:
    """Build (and so check: enough windows, tokens < vocab_size) this rank's data.

    Called before any process group exists, so a data set that cannot feed the layout fails
    with a ConfigError on every rank instead of inside a collective."""
    check_vocab(corpus, vocab_size)
    common = dict(seq_len=train.seq_len, micro_batch_size=train.micro_batch_size,
                  dp_rank=dp_rank, dp_size=dp_size, vocab_size=vocab_size)
    return RankData(ShardedSampler(corpus.train, seed=train.seed, **common),
                    eval_batches(corpus.val, num_batches=train.eval_batches, **common))


def check_vocab(corpus: Corpus, vocab_size: int) -> None:
    """Every token id must be < vocab_size. Byte corpora need no scan; a token file is scanned
    once (sequentially, through the page cache) when its dtype can hold larger ids, so a bad
    file fails on every rank at start-up rather than on one rank mid-run."""
    for name, part in (("train", corpus.train), ("held-out", corpus.val)):
        dtype = part.dtype
        limit = torch.iinfo(dtype).max if isinstance(part, torch.Tensor) else np.iinfo(dtype).max
        if limit < vocab_size and (isinstance(part, torch.Tensor) or part.dtype.kind == "u"):
            continue
        lo, hi = int(part.min()), int(part.max())
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise ConfigError(f"{name} data holds token {bad}, outside [0, model.vocab_size="
                              f"{vocab_size}): {corpus.description}")

"""A weighted mixture of token datasets, as one deterministic stream of windows.

Global sample g lies in block b = g // BLOCK. Each block holds quota_k samples of dataset k
(its weight's share of BLOCK, largest remainders; every quota >= 1), in an order shuffled with
a generator seeded by (seed, b). The n-th sample of dataset k in block b is that dataset's
own sample b * quota_k + n, read from its own per-epoch shuffled windows (a small dataset
repeats sooner). Every number follows from g alone: the data position of a mixture stays
one number, the global samples seen, and a run resumes or reshards exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from model.errors import ConfigError

BLOCK = 1024


@dataclass(frozen=True, eq=False)
class Mixture:
    """Token arrays with positive weights; `bytes_per_token` of each (None when unknown)."""

    parts: list
    weights: list[float]
    names: list[str]
    bytes_per_token: list[float | None]

    def __post_init__(self):
        if not len(self.parts) == len(self.weights) == len(self.names) == len(self.bytes_per_token):
            raise ValueError("a mixture needs one weight, name and bytes_per_token per part")
        for name, w in zip(self.names, self.weights):
            if not w > 0:
                raise ConfigError(f"mixture weight of {name} ({w}) must be > 0")

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    ndim = 1
    dtype = property(lambda self: self.parts[0].dtype)


def derived_seed(*parts) -> int:
    """A 63-bit seed from the run's seed and a label (stable across runs and processes)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def quotas(weights: list[float], names: list[str], block: int = BLOCK) -> list[int]:
    """Samples of each part per block: block * w / sum(w), rounded by largest remainder."""
    total = sum(weights)
    exact = [block * w / total for w in weights]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:block - sum(counts)]:
        counts[i] += 1
    for name, w, c in zip(names, weights, counts):
        if c < 1:
            raise ConfigError(f"mixture weight of {name} ({w} of {total}) is below 1/{block} of the "
                              f"total: it would never be drawn in a block of {block} samples")
    return counts


class MixedWindows:
    """Maps a global sample to (part, that part's sample) and reads windows of the parts,
    each a Windows (trainer/data/sampler.py) with its own seed."""

    def __init__(self, parts: list, weights: list[float], names: list[str], seed: int):
        self.parts, self.seed = parts, seed
        self.quota = quotas(weights, names)
        self.num_samples = sum(p.num_samples for p in parts)
        self._block, self._part, self._rank = -1, None, None  # cache of one block's layout

    def locate(self, g: int) -> tuple[int, int]:
        b, pos = divmod(g, BLOCK)
        if b != self._block:
            order = torch.randperm(BLOCK, generator=torch.Generator().manual_seed(derived_seed(self.seed, "block", b)))
            part = np.repeat(np.arange(len(self.quota)), self.quota)[order.numpy()]  # (BLOCK,)
            rank = np.empty(BLOCK, dtype=np.int64)
            for k in range(len(self.quota)):
                rank[part == k] = np.arange(self.quota[k])
            self._block, self._part, self._rank = b, part, rank
        k = int(self._part[pos])
        return k, b * self.quota[k] + int(self._rank[pos])

    def read(self, samples: list[int]) -> torch.Tensor:
        """(len(samples), seq_len + 1) int64 windows of these global samples."""
        where = [self.locate(g) for g in samples]
        rows = [None] * len(samples)
        for k in {k for k, _ in where}:
            mine = [i for i, (kk, _) in enumerate(where) if kk == k]
            for i, window in zip(mine, self.parts[k].read([where[i][1] for i in mine])):
                rows[i] = window
        return torch.stack(rows)

    def counts(self, n: int) -> list[int]:
        """Samples of each part among global samples 0 .. n-1."""
        out = [0] * len(self.parts)
        for g in range(n):
            out[self.locate(g)[0]] += 1
        return out

"""A resumable sharded sampler: windows of seq_len + 1 tokens, shuffled per epoch, split
over dp ranks, from one token array or a weighted mixture of several (trainer/data/mixture.py).
"""

from __future__ import annotations

import numpy as np
import torch

from model.errors import DataError
from trainer.data.mixture import MixedWindows, Mixture, derived_seed


def _integer_1d(tokens) -> None:
    is_torch = isinstance(tokens, torch.Tensor)
    integer = (not tokens.dtype.is_floating_point and not tokens.dtype.is_complex
               if is_torch else np.issubdtype(tokens.dtype, np.integer))
    if tokens.ndim != 1 or not integer:
        raise ValueError(f"tokens must be a 1-D integer array, got ndim={tokens.ndim}, "
                         f"dtype={tokens.dtype}")


class Windows:
    """One token array cut into non-overlapping windows of seq_len + 1 tokens. Sample g is
    window perm_epoch[g % num_samples], epoch = g // num_samples, the permutation drawn
    with seed + epoch (or the identity when not shuffled)."""

    def __init__(self, tokens, seq_len: int, seed: int, shuffle: bool = True):
        _integer_1d(tokens)
        self.tokens, self._is_torch = tokens, isinstance(tokens, torch.Tensor)
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.num_samples = (len(tokens) - 1) // seq_len
        self._offsets = torch.arange(seq_len + 1)  # (L+1,)
        self._perm_epoch, self._perm = -1, None  # cache of the current epoch's permutation

    def index(self, g: int) -> int:
        epoch, pos = divmod(g, self.num_samples)
        if not self.shuffle:
            return pos
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_samples, generator=gen), epoch
        return int(self._perm[pos])

    def read(self, samples: list[int]) -> torch.Tensor:
        """(len(samples), seq_len + 1) int64 windows of these samples."""
        idx = torch.tensor([self.index(g) for g in samples])[:, None] * self.seq_len + self._offsets  # (B, L+1)
        if self._is_torch:
            return self.tokens[idx].long()
        # fancy indexing reads only these windows from a memmap (or a prepared dataset's shards)
        return torch.from_numpy(np.asarray(self.tokens[idx.numpy()], dtype=np.int64))


class ShardedSampler:
    """Micro-step m on rank r takes global samples g = (m * dp_size + r) * micro_batch_size + j.
    So all ranks together read one contiguous, disjoint block of the stream per micro-step, and
    the data position is one number, the global samples seen: a resumed run continues at the
    first unseen sample even when dp or the batch size changed (`batch_at`).

    `tokens` is one token array (Windows) or a Mixture (MixedWindows: dataset k's windows
    seeded from (seed, k), the blocks from (seed, block))."""

    def __init__(self, tokens, seq_len: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, shuffle: bool = True,
                 vocab_size: int | None = None, what: str = "data", hint: str = "") -> None:
        if seq_len < 1 or micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler shape: seq_len={seq_len}, micro_batch_size="
                             f"{micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.vocab_size = seed, shuffle, vocab_size
        if isinstance(tokens, Mixture):
            parts = [Windows(p, seq_len, derived_seed(seed, "part", k), shuffle) for k, p in enumerate(tokens.parts)]
            for name, part, n in zip(tokens.names, parts, (len(p) for p in tokens.parts)):
                if part.num_samples < 1:
                    raise DataError(f"{what}: {name} has {n} tokens, not one window of seq_len {seq_len}")
            self.stream = MixedWindows(parts, tokens.weights, tokens.names, seed)
        else:
            self.stream = Windows(tokens, seq_len, seed, shuffle)
            needed = micro_batch_size * dp_size
            if self.stream.num_samples < needed:
                raise DataError(
                    f"{what}: {len(tokens)} tokens give {self.stream.num_samples} windows of seq_len "
                    f"{seq_len}, fewer than micro_batch_size * dp_size = {needed} needed per step{hint}"
                )
        self.num_samples = self.stream.num_samples

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
        windows = self.stream.read([base + j for j in range(self.micro_batch_size)])  # (B, L+1)
        if self.vocab_size is not None:  # cheap per batch; token files can hold anything
            lo, hi = int(windows.min()), int(windows.max())
            if hi >= self.vocab_size or lo < 0:
                raise DataError(f"token {hi if hi >= self.vocab_size else lo} in the batch at "
                                  f"global sample {base} is outside [0, vocab_size={self.vocab_size})")
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_batches(tokens, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_batches: int, vocab_size: int | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's `num_batches` held-out batches: the first windows in order, no shuffle.

    The stream cycles when the held-out set is small, so every rank runs exactly
    `num_batches` forward passes (the model's collectives need all ranks in step).
    """
    sampler = eval_sampler(tokens, seq_len, micro_batch_size, dp_rank, dp_size, num_batches, vocab_size)
    return [sampler.batch(m) for m in range(num_batches)]


def eval_sampler(tokens, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_batches: int, vocab_size: int | None = None) -> ShardedSampler:
    if num_batches < 1:
        raise ValueError(f"num_batches ({num_batches}) must be >= 1")
    return ShardedSampler(tokens, seq_len, micro_batch_size, dp_rank, dp_size, seed=0,
                          shuffle=False, vocab_size=vocab_size, what="held-out data")

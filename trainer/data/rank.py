"""What one dp rank reads, built (and so checked) before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.errors import DataError
from trainer.config import TrainConfig
from trainer.data.corpus import Corpus
from trainer.data.mixture import MixedWindows, Mixture
from trainer.data.sampler import ShardedSampler, eval_sampler


@dataclass(frozen=True, eq=False)
class RankData:
    """One dp rank's training sampler and fixed held-out batches."""

    sampler: ShardedSampler
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    val_bytes_per_token: float | None = None
    """UTF-8 bytes per token of the whole held-out evaluation (every rank's batches): bits per
    byte = loss / ln 2 / this. 1 for byte data; None when unknown (a token file)."""
    corpus: Corpus | None = None
    """What the data is (its tokenizer, its fingerprint), for the checkpoints' metadata."""


def rank_data(corpus: Corpus, train: TrainConfig, vocab_size: int, dp_rank: int, dp_size: int) -> RankData:
    """Build (and so check: enough windows, tokens < vocab_size) this rank's data.

    Called before any process group exists, so a data set that cannot feed the layout fails
    with a ConfigError on every rank instead of inside a collective."""
    check_vocab(corpus, vocab_size)
    common = dict(seq_len=train.seq_len, micro_batch_size=train.micro_batch_size,
                  dp_rank=dp_rank, dp_size=dp_size, vocab_size=vocab_size)
    sampler = ShardedSampler(corpus.train, seed=train.seed, what="training data", hint=corpus.hint, **common)
    val = eval_sampler(corpus.val, num_batches=train.eval_batches, **common)
    return RankData(sampler, [val.batch(m) for m in range(train.eval_batches)],
                    _bytes_per_token(corpus, val, train.eval_batches * train.micro_batch_size * dp_size),
                    corpus)


def _bytes_per_token(corpus: Corpus, val: ShardedSampler, samples: int) -> float | None:
    """A mixture's held-out windows come from its datasets in the block order: weigh each
    dataset's bytes per token by its share of the `samples` global samples evaluated."""
    if not isinstance(val.stream, MixedWindows):
        return corpus.val_bytes_per_token
    ratios = corpus.val.bytes_per_token
    counts = val.stream.counts(samples)
    if any(r is None for r, c in zip(ratios, counts) if c):
        return None
    return sum(r * c for r, c in zip(ratios, counts) if c) / samples


def _largest(tokens) -> tuple[int, int, str]:
    """(smallest id, largest id, where the largest is) without reading a prepared dataset."""
    if hasattr(tokens, "maxima"):  # ConcatTokens: ids are unsigned, maxima recorded per shard
        i = int(np.argmax(tokens.maxima)) if tokens.maxima else 0
        return 0, tokens.max_id, f" (in {tokens.names[i]})" if tokens.maxima else ""
    return int(tokens.min()), int(tokens.max()), ""


def check_vocab(corpus: Corpus, vocab_size: int) -> None:
    """Every token id must be < vocab_size. Byte corpora need no scan; a prepared dataset's
    largest ids are in its metadata; a token file is scanned once (sequentially, through the
    page cache) when its dtype can hold larger ids, so a bad file fails on every rank at
    start-up rather than on one rank mid-run."""
    for name, part in (("train", corpus.train), ("held-out", corpus.val)):
        pieces = zip(part.names, part.parts) if isinstance(part, Mixture) else [(corpus.description, part)]
        for what, tokens in pieces:
            dtype = tokens.dtype
            limit = torch.iinfo(dtype).max if isinstance(tokens, torch.Tensor) else np.iinfo(dtype).max
            if limit < vocab_size and (isinstance(tokens, torch.Tensor) or dtype.kind == "u"):
                continue
            lo, hi, where = _largest(tokens)
            if lo < 0 or hi >= vocab_size:
                raise DataError(f"{name} data holds token {hi if hi >= vocab_size else lo}{where}, outside "
                                  f"[0, model.vocab_size={vocab_size}): {what}")

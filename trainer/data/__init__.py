"""Token data for LM training, one module per concept:

    corpus       the sources (stdlib, text, tokens, prepared) split into train and held-out
    prepared     reading prepared datasets; mixture: several of them by weight
    sampler      windows of seq_len + 1, shuffled per epoch, split over dp ranks
    rank         one dp rank's sampler and held-out batches, checked before any collective
    fingerprint  what a run read, to refuse a changed dataset on resume
    tokenizer, inputs, documents, shards, worker, prepare: `moe-prepare-data`

The names below are imported on first use, so `python -m trainer.data.prepare` and its
worker processes do not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Corpus": "corpus", "load_corpus": "corpus", "is_held_out": "split",
    "ShardedSampler": "sampler", "eval_batches": "sampler",
    "RankData": "rank", "rank_data": "rank", "check_vocab": "rank",
    "Mixture": "mixture", "load_prepared": "prepared", "PreparedDataset": "prepared",
    "fingerprint_change": "fingerprint", "fingerprint_files": "fingerprint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

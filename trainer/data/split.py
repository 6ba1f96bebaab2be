"""Which documents are held out for evaluation: a stable hash, the same on every rank and run.

Light on purpose (no torch, no numpy): the preparation workers import it too.
"""

from __future__ import annotations

import hashlib


def is_held_out(key: str | bytes, holdout_fraction: float) -> bool:
    """Whether a document goes to the held-out set, by its key: a file's relative posix path
    (text files, the stdlib) or a document's own bytes (jsonl and parquet documents).

    sha1, not the salted built-in hash(), so every rank and every run agrees; adding or
    removing one document does not move any other between the splits, and identical
    documents land on the same side (no copy of a held-out document is trained on).
    """
    data = key.encode("utf-8") if isinstance(key, str) else key
    bucket = int.from_bytes(hashlib.sha1(data).digest()[:8], "big")
    return bucket % 10_000 < holdout_fraction * 10_000

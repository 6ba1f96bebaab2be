"""One unit of a preparation: read its pieces, tokenize, split, write its shards and record.

Runs in the pool's worker processes (init() once per process, then run_unit per unit) or,
with --workers 0, in the calling process. Memory stays bounded: documents are encoded in
batches of about BATCH_BYTES and streamed to the shard files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.documents import Segment, Skipped, segments
from trainer.data.inputs import InputFile, Piece
from trainer.data.shards import SPLITS, ShardWriter, record_file, shard_file, write_json
from trainer.data.split import is_held_out
from trainer.data.tokenizer import Tokenizer, load_tokenizer

BATCH_BYTES = 1 << 20
BATCH_DOCS = 4096

# (unit index, documents, tokens, input bytes) since the last report: the progress bar's feed.
Report = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class Job:
    """What every worker needs, sent once per process."""

    files: list[InputFile]
    out: str
    tokenizer: str
    """`bytes` or the dataset's own tokenizer.json."""
    eos: str | None
    field: str
    holdout_fraction: float
    on_error: str
    dtype: str


_worker: dict = {}  # this worker process's job, tokenizer and report function (set by init)


def init(job: Job, queue) -> None:
    """Pool initializer. One process per core: the tokenizer's own threads would only compete."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(job=job, tokenizer=load_tokenizer(job.tokenizer, job.eos),
                   report=lambda *counts: queue.put(counts))


def run_unit(index: int, unit: tuple[Piece, ...]) -> dict:
    return process_unit(_worker["job"], _worker["tokenizer"], index, unit, _worker["report"])


class _UnitWriter:
    """The two shards of a unit and their document counts."""

    def __init__(self, job: Job, tok: Tokenizer, index: int):
        out, dtype = Path(job.out), np.dtype(job.dtype)
        self.job, self.tok = job, tok
        self.writers = {s: ShardWriter(out / shard_file(s, index), dtype) for s in SPLITS}
        self.counts = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
        self.empty = 0
        self.doc_tokens, self.doc_began_here = 0, False
        self._eos = np.array([tok.eos_id], dtype=np.int64)

    def add(self, batch: list[Segment]) -> tuple[int, int]:
        """Encode and write a batch of segments; returns (documents ended, tokens written)."""
        parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        ended = tokens = 0
        if not batch:
            return ended, tokens
        for seg, ids in zip(batch, self.tok.encode_batch([s.data for s in batch])):
            split = "val" if is_held_out(seg.key, self.job.holdout_fraction) else "train"
            if seg.first:
                self.doc_tokens, self.doc_began_here = 0, True
            self.doc_tokens += len(ids)
            parts[split].append(ids)
            self.counts[split]["bytes"] += len(seg.data)
            if seg.last:
                if self.doc_began_here and not self.doc_tokens:
                    self.empty += 1  # an empty document: no EOS, not counted as a document
                else:
                    parts[split].append(self._eos)
                    self.counts[split]["documents"] += 1
                    ended += 1
                self.doc_began_here = False
        for split, arrays in parts.items():
            if arrays:
                ids = np.concatenate(arrays)
                self.writers[split].write(ids)
                tokens += len(ids)
        return ended, tokens

    def commit(self) -> dict:
        return {s: self.writers[s].commit() | self.counts[s] for s in SPLITS}

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def process_unit(job: Job, tok: Tokenizer, index: int, unit: tuple[Piece, ...],
                 report: Report | None = None) -> dict:
    """Write unit `index`'s shards, then its record (the mark of a finished unit); returns it."""
    writer, skipped = _UnitWriter(job, tok, index), Skipped()
    batch: list[Segment] = []
    size = advance = 0

    def flush() -> None:
        nonlocal size, advance
        docs, tokens = writer.add(batch)
        if report:
            report(index, docs, tokens, advance)
        batch.clear()
        size = advance = 0

    try:
        for piece in unit:
            for seg in segments(job.files[piece.file], piece, job.field, job.on_error, skipped):
                batch.append(seg)
                size, advance = size + len(seg.data), advance + seg.advance
                if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
                    flush()
        flush()
        splits = writer.commit()
    except BaseException:
        writer.abort()
        raise
    record = {"index": index, **splits, "empty_documents": writer.empty,
              "skipped": skipped.count, "skipped_examples": skipped.examples}
    write_json(Path(job.out) / record_file(index), record)
    return record

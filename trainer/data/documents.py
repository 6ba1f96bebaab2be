"""Reading the documents of one piece of an input file, streaming, in bounded memory.

text: a file is one document, read in blocks of about BLOCK bytes cut after a newline (a
  token never spans a block boundary inside a line); jsonl: a line is one document, its
  `field`; parquet: a row is one document, its `field` column, read in record batches.
Bad records (invalid JSON, a missing or non-string field, a null) raise naming the file and
line or row, or with on_error="skip" are counted and passed over.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from model.errors import ConfigError
from trainer.data.inputs import InputFile, Piece

BLOCK = 1 << 20
PARQUET_BATCH_ROWS = 1024
ON_ERROR = ("fail", "skip")
_EXAMPLES = 5  # skipped records named in the report


@dataclass(frozen=True)
class Segment:
    data: bytes
    key: bytes | str
    """The held-out key of its document: a text file's relative name, else the document itself."""
    first: bool
    """It begins its document."""
    last: bool
    """It ends its document (an EOS follows it)."""
    advance: int
    """Input bytes consumed with it (the progress bar's measure)."""


@dataclass
class Skipped:
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, on_error: str) -> None:
        if on_error != "skip":
            raise ConfigError(f"{where} (--on-error skip passes over bad records)")
        self.count += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(where)


def align(f, offset: int, size: int) -> int:
    """The first position >= offset that starts a line (or the end of the file)."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    f.seek(offset - 1)
    pos = offset - 1
    while block := f.read(1 << 16):
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return size


def _char_boundary(data: bytes) -> int:
    """The longest prefix of `data` that does not end inside a UTF-8 character."""
    j = len(data) - 1
    while j >= max(0, len(data) - 4) and data[j] & 0xC0 == 0x80:
        j -= 1
    if j >= 0 and data[j] >= 0xC0:
        need = 4 if data[j] >= 0xF0 else 3 if data[j] >= 0xE0 else 2
        if len(data) - j < need:
            return j or len(data)
    return len(data)


def _text(f, file: InputFile, piece: Piece) -> Iterator[Segment]:
    start, stop = align(f, piece.start, file.size), align(f, piece.stop, file.size)
    first, last = start == 0, stop == file.size
    f.seek(start)
    pos, carry, ended = start, b"", False
    while pos < stop:
        block = f.read(min(BLOCK, stop - pos))
        if not block:
            break  # the file shrank since it was listed
        pos += len(block)
        data = carry + block
        cut = (data.rfind(b"\n") + 1 or _char_boundary(data)) if pos < stop else len(data)
        carry = data[cut:]
        ended = last and pos >= stop
        yield Segment(data[:cut], file.rel, first, ended, len(block))
        first = False
    if carry or (last and not ended):  # also: an empty file, or a last piece left empty by align()
        yield Segment(carry, file.rel, first, last, 0)


def line_number(path: str, offset: int) -> int:
    """Lines before byte `offset` of a file: counted only to name a bad line."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0 and (block := f.read(min(BLOCK, offset))):
            count += block.count(b"\n")
            offset -= len(block)
    return count


def _jsonl(f, file: InputFile, piece: Piece, name: str, on_error: str, skipped: Skipped) -> Iterator[Segment]:
    start, stop = align(f, piece.start, file.size), align(f, piece.stop, file.size)
    f.seek(start)
    pos, index, pending = start, 0, 0
    while pos < stop and (line := f.readline()):
        pos, index, pending = pos + len(line), index + 1, pending + len(line)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None
        except ValueError as exc:  # also invalid UTF-8
            record, problem = None, f"invalid JSON ({getattr(exc, 'msg', exc)})"
        if problem is None:
            problem = _field_problem(record, name)
        if problem:
            skipped.add(f"{file.path}:{line_number(file.path, start) + index}: {problem}", on_error)
            continue
        data = record[name].encode("utf-8")
        yield Segment(data, data, True, True, pending)
        pending = 0


def _field_problem(record, name: str) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object with field {name!r}"
    if name not in record:
        return f"no field {name!r} (fields: {', '.join(map(str, record)) or 'none'}); choose one with --field"
    if not isinstance(record[name], str):
        return f"field {name!r} is a {type(record[name]).__name__}, not a string"
    return None


def _parquet(file: InputFile, piece: Piece, name: str, on_error: str, skipped: Skipped) -> Iterator[Segment]:
    import pyarrow.parquet as pq

    row = sum(rows for rows, _ in file.row_groups[:piece.start])
    rows = sum(r for r, _ in file.row_groups[piece.start:piece.stop]) or 1
    size = sum(b for _, b in file.row_groups[piece.start:piece.stop])
    pf = pq.ParquetFile(file.path)
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=range(piece.start, piece.stop),
                                 columns=[name]):
        values = batch.column(0).to_pylist()
        for value in values:
            row += 1
            if value is None:
                skipped.add(f"{file.path}: row {row}: column {name!r} is null", on_error)
                continue
            data = value.encode("utf-8")
            yield Segment(data, data, True, True, size // rows)


def segments(file: InputFile, piece: Piece, name: str = "text", on_error: str = "fail",
             skipped: Skipped | None = None) -> Iterator[Segment]:
    """The segments of one piece, in order. `skipped` collects bad records under on_error=skip."""
    skipped = skipped if skipped is not None else Skipped()
    if file.kind == "parquet":
        yield from _parquet(file, piece, name, on_error, skipped)
        return
    try:
        with open(file.path, "rb") as f:
            yield from (_text(f, file, piece) if file.kind == "text"
                        else _jsonl(f, file, piece, name, on_error, skipped))
    except OSError as exc:
        raise ConfigError(f"input file {file.path} cannot be read: {exc.strerror}") from None

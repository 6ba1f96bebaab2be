"""The input of a preparation: its files (text, jsonl, parquet) and the units of work.

A unit is a list of pieces of input files of about `unit_bytes` together: small files are
grouped, a large text or jsonl file is cut into byte ranges (each worker moves both ends of
its range to just after a newline, so neighbours meet exactly), a parquet file into runs of
row groups. The plan depends on the inputs and unit_bytes only, never on the number of
workers, so the output is the same at any core count and a restarted run finds the same
units finished.
"""

from __future__ import annotations

import glob as globlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from model.errors import ConfigError

FORMATS = ("auto", "text", "jsonl", "parquet")
_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
# Files taken from a folder when no --glob is given, per --format.
DEFAULT_GLOBS = {"text": ("**/*.txt",), "jsonl": ("**/*.jsonl",), "parquet": ("**/*.parquet",),
                 "auto": ("**/*.txt", "**/*.jsonl", "**/*.parquet")}
_STDLIB_EXCLUDED = ("site-packages", "dist-packages", "__pycache__")


@dataclass(frozen=True)
class InputFile:
    path: str
    rel: str
    """Relative posix name: a text document's held-out key and its name in messages."""
    kind: str
    size: int
    mtime_ns: int
    row_groups: tuple[tuple[int, int], ...] = ()
    """parquet: (rows, uncompressed bytes) of each row group."""


@dataclass(frozen=True)
class Piece:
    file: int
    """Index into the list of input files."""
    start: int
    """text, jsonl: a byte offset (moved to just after a newline by the reader); parquet: a row group."""
    stop: int


def _magic(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _expand(spec: str, patterns: tuple[str, ...]) -> list[tuple[str, str]]:
    """(path, relative name) of the files one --input names."""
    if _magic(spec):
        parts = Path(spec).parts
        fixed = parts[:next(i for i, p in enumerate(parts) if _magic(p))]  # the folder above the pattern
        base = Path(*fixed) if fixed else Path(".")
        paths = globlib.glob(spec, recursive=True)
    elif Path(spec).is_dir():
        base = Path(spec)
        paths = [str(p) for pattern in patterns for p in base.glob(pattern)]
    elif Path(spec).exists():
        return [(spec, Path(spec).name)]
    else:
        raise ConfigError(f"input {spec} does not exist")
    return sorted({(p, Path(p).relative_to(base).as_posix()) for p in paths if Path(p).is_file()})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[tuple[str, str]]:
    """(path, relative name) of the running interpreter's standard-library *.py files, outside
    site-packages, sorted by name: what data.source=stdlib reads."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED]
        rel_dir = Path(dirpath).relative_to(root)
        out += [(str(Path(dirpath, f)), (rel_dir / f).as_posix()) for f in filenames if f.endswith(".py")]
    return sorted(out, key=lambda pr: pr[1])


def find_inputs(inputs: list[str], fmt: str = "auto", glob: str | None = None, field: str = "text",
                stdlib: bool = False) -> list[InputFile]:
    """Every input file, checked: it exists, can be read, and (parquet) has `field` as a string
    column. Sorted per --input, in the order given; a file named twice is read once."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format ({fmt!r}) must be one of: {', '.join(FORMATS)}")
    patterns = (glob,) if glob else DEFAULT_GLOBS[fmt]
    found: list[tuple[str, str]] = stdlib_files() if stdlib else []
    for spec in inputs:
        files = _expand(spec, patterns)
        if not files:
            raise ConfigError(f"input {spec} matches no file (patterns: {', '.join(patterns)}; "
                              "set --glob to choose others)")
        found += files
    if not found:
        raise ConfigError("no input: give --input PATH (a file, folder or glob) or --stdlib")
    seen, out = set(), []
    for path, rel in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            out.append(_checked(path, rel, fmt if fmt != "auto" else _BY_SUFFIX.get(Path(path).suffix, "text"),
                                field))
    return out


def _checked(path: str, rel: str, kind: str, field: str) -> InputFile:
    try:
        with open(path, "rb") as f:
            f.read(1)
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"input file {path} cannot be read: {exc.strerror}") from None
    groups: tuple[tuple[int, int], ...] = ()
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"parquet file {path} cannot be read: {exc}") from None
        schema = meta.schema_arrow
        if field not in schema.names:
            raise ConfigError(f"parquet file {path} has no column {field!r} (columns: "
                              f"{', '.join(schema.names)}); choose one with --field")
        if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
            raise ConfigError(f"parquet file {path}: column {field!r} is {schema.field(field).type}, not a string")
        md = meta.metadata
        groups = tuple((md.row_group(i).num_rows, md.row_group(i).total_byte_size) for i in range(md.num_row_groups))
    return InputFile(path, rel, kind, st.st_size, st.st_mtime_ns, groups)


def plan_units(files: list[InputFile], unit_bytes: int) -> list[tuple[Piece, ...]]:
    """Consecutive pieces of about unit_bytes per unit (see the module docstring)."""
    if unit_bytes < 1:
        raise ConfigError(f"--unit-bytes ({unit_bytes}) must be >= 1")
    units: list[tuple[Piece, ...]] = []
    current: list[Piece] = []
    filled = 0

    def add(piece: Piece, size: int) -> None:
        nonlocal current, filled
        if current and filled + size > unit_bytes:
            units.append(tuple(current))
            current, filled = [], 0
        current.append(piece)
        filled += size

    for i, f in enumerate(files):
        if f.kind == "parquet":
            for g, (_, size) in enumerate(f.row_groups):
                add(Piece(i, g, g + 1), size)
        else:
            for start in range(0, max(f.size, 1), unit_bytes):  # an empty file is one empty piece
                add(Piece(i, start, min(start + unit_bytes, f.size)), min(unit_bytes, f.size - start))
    if current:
        units.append(tuple(current))
    return _merge_row_groups(units)


def _merge_row_groups(units: list[tuple[Piece, ...]]) -> list[tuple[Piece, ...]]:
    """Consecutive row groups of one file within a unit read as one piece."""
    out = []
    for unit in units:
        merged: list[Piece] = []
        for p in unit:
            last = merged[-1] if merged else None
            if last and last.file == p.file and last.stop == p.start:
                merged[-1] = Piece(p.file, last.start, p.stop)
            else:
                merged.append(p)
        out.append(tuple(merged))
    return out


def unit_bytes_of(unit: tuple[Piece, ...], files: list[InputFile]) -> int:
    """Input bytes of a unit (uncompressed for parquet): the progress bar's measure."""
    total = 0
    for p in unit:
        f = files[p.file]
        total += sum(b for _, b in f.row_groups[p.start:p.stop]) if f.kind == "parquet" else p.stop - p.start
    return total

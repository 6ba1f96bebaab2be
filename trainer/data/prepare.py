"""Prepare a dataset: `moe-prepare-data` (or `python -m trainer.data.prepare`).

    python -m trainer.data.prepare --stdlib --train-tokenizer bpe --vocab-size 4096 --output runs/data/stdlib_bpe
    python -m trainer.data.prepare --input corpus/ --format jsonl --field text --tokenizer tokenizer.json --output DIR

Inputs (text files, folders, globs; jsonl with a named field; parquet with a named column)
are planned into units of about --unit-bytes, which a pool of processes (one per core)
tokenizes into sharded token files (see trainer/data/shards.py for the layout). A killed run
started again with the same command finishes the units that are missing and redoes nothing
else; an output directory that holds anything else is refused, never written to. One job at a
time writes an output directory: it holds `.lock` (flock) throughout, and a second job is
refused (exit status 7, as the trainer's run-dir lock) without touching the first one's files.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.errors import ConfigError
from trainer.data import worker
from trainer.data.documents import ON_ERROR, Skipped, segments
from trainer.data.inputs import FORMATS, InputFile, Piece, find_inputs, plan_units, unit_bytes_of
from trainer.data.shards import (FORMAT, META, PLAN, SPLITS, VERSION, record_file, remove_partial,
                                 token_dtype, write_json)
from trainer.data.split import is_held_out
from trainer.data.tokenizer import BYTES, TOKENIZER_FILE, Tokenizer, TokenizerInfo, load_tokenizer, train_bpe

DEFAULT_UNIT_BYTES = 16 << 20
LOCK_FILE = ".lock"
BUSY_EXIT = 7  # launcher/exit_codes.RUN_DIR_BUSY (tests hold them equal); trainer/ never imports launcher/


class OutputBusy(Exception):
    """Another moe-prepare-data is writing the output directory."""


def _request(files: list[InputFile], tokenizer: dict, field: str, holdout: float, unit_bytes: int) -> dict:
    """What makes a dataset this dataset: a restart must ask for the same to continue it.
    (--workers and --on-error change no finished shard, so they may change.)"""
    return {"inputs": [[f.path, f.kind, f.size, f.mtime_ns] for f in files], "tokenizer": tokenizer,
            "field": field, "holdout_fraction": holdout, "unit_bytes": unit_bytes}


def _difference(saved: dict, ours: dict) -> str:
    for key in ours:
        if key == "inputs" and saved.get(key) != ours[key]:
            theirs = {row[0]: row for row in saved.get(key, [])}
            for row in ours[key]:
                if theirs.get(row[0]) != row:
                    return f"input {row[0]} " + ("is new" if row[0] not in theirs else "changed (size or time)")
            return f"it also read {len(theirs) - len(ours[key])} other file(s)"
        if saved.get(key) != ours[key]:
            return f"{key} is {saved.get(key)!r} there, {ours[key]!r} here"
    return "it was prepared by another version"


def _existing(out: Path, request: dict) -> dict | None:
    """Refuse `out` unless it is new or empty, or holds a run of this same request (returns its
    meta.json when that run finished). Reads only, so a refused directory is left as it is."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file, not a directory")
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if not names:
        return None
    if PLAN not in names:
        raise ConfigError(f"--output {out} is not empty ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
                          "and holds no dataset of moe-prepare-data: choose a new or empty directory")
    saved = json.loads((out / PLAN).read_text())
    if saved.get("request") != request:
        raise ConfigError(f"--output {out} holds another dataset ({_difference(saved.get('request', {}), request)}); "
                          "nothing was changed there: choose another --output, or delete it to prepare anew")
    return json.loads((out / META).read_text()) if (out / META).is_file() else None


def _busy(fd: int, out: Path) -> OutputBusy:
    holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "holder unknown"
    return OutputBusy(f"--output {out} is being written by another moe-prepare-data ({holder}); "
                      "nothing was changed there: wait for it to end, or choose another --output")


def _refuse_if_busy(out: Path) -> None:
    """A job holding the lock is named before the directory is judged: what it is writing is
    not a dataset yet. Creates nothing."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file, or no directory
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(fd, out) from None
    finally:
        os.close(fd)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `out/.lock` while preparing: two jobs on one output would remove each other's
    files in progress. flock is released by the kernel when its holder dies, so a killed job
    leaves no stale lock; the file stays (unlinking a lock file lets two holders in)."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(fd, out) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _claim(out: Path, request: dict) -> dict | None:
    """Under the lock: `_existing` again (another job may have written since), and the plan
    written for a new dataset."""
    meta = _existing(out, request)
    if meta is None and not (out / PLAN).is_file():
        write_json(out / PLAN, {"format": FORMAT, "version": VERSION, "request": request})
    return meta


def _tokenizer(args, given: Tokenizer | None, files: list[InputFile], out: Path) -> tuple[str, str | None]:
    """Train the tokenizer, or copy the given one into the dataset; returns what workers
    load: (`bytes` or the dataset's tokenizer.json, its EOS token)."""
    own = out / TOKENIZER_FILE
    if given is None:
        if not own.is_file():  # an earlier attempt's is complete (written atomically): keep it
            train_bpe(_training_texts(files, args), args.vocab_size, own)
        return str(own), None
    if given.path is None:
        return BYTES, None
    if not own.is_file():
        tmp = own.with_name(f"{own.name}.tmp-{os.getpid()}")
        shutil.copyfile(given.path, tmp)
        os.replace(tmp, own)
    return str(own), given.eos_token


def _training_texts(files: list[InputFile], args):
    """The training split's documents, as the workers will read them (held-out ones never
    reach the tokenizer's trainer)."""
    skipped = Skipped()
    for i, f in enumerate(files):
        whole = Piece(i, 0, len(f.row_groups) if f.kind == "parquet" else f.size)
        for seg in segments(f, whole, args.field, args.on_error, skipped):
            if not is_held_out(seg.key, args.holdout_fraction):
                yield seg.data


def _finished(out: Path, count: int, itemsize: int) -> dict[int, dict]:
    """Units whose record and token files are complete; a record whose files do not match
    it is removed (its unit is redone)."""
    done = {}
    for i in range(count):
        path = out / record_file(i)
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        if all(record[s]["file"] is None or (out / record[s]["file"]).is_file()
               and (out / record[s]["file"]).stat().st_size == record[s]["tokens"] * itemsize for s in SPLITS):
            done[i] = record
        else:
            path.unlink()
    return done


def _run(units, todo: list[int], job: worker.Job, workers: int, bar: tqdm, sizes: list[int]) -> dict[int, dict]:
    """Process units `todo`: in this process (workers 0) or a pool. A failure stops the pool
    after the running units end (their shards stay, complete)."""
    counted = {i: 0 for i in todo}
    totals = [0, 0]
    start = time.perf_counter()

    def report(index, docs, tokens, advance):
        counted[index] += advance
        totals[0] += docs
        totals[1] += tokens
        bar.update(advance)
        rate = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{totals[0] / rate:,.0f} docs/s, {totals[1] / rate:,.0f} tokens/s", refresh=False)

    def finish(index):
        bar.update(sizes[index] - counted[index])

    records = {}
    if workers == 0:
        tok = load_tokenizer(job.tokenizer, job.eos)
        for i in todo:
            records[i] = worker.process_unit(job, tok, i, units[i], report)
            finish(i)
        return records
    ctx = mp.get_context("spawn")  # no fork of a process that may hold the tokenizer's threads
    queue = ctx.Queue()
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker.init, initargs=(job, queue))
    try:
        pending = {pool.submit(worker.run_unit, i, units[i]): i for i in todo}
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while not queue.empty():
                report(*queue.get())
            for fut in done:
                i = pending.pop(fut)
                records[i] = fut.result()  # a worker's error is raised here
                finish(i)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return records


def prepare(args: argparse.Namespace) -> dict:
    """Prepare (or finish preparing) the dataset `args` describe; returns its meta.json."""
    _check(args)
    files = find_inputs(args.input, args.format, args.glob, args.field, args.stdlib)
    out = Path(args.output)
    given = None if args.train_tokenizer else load_tokenizer(args.tokenizer, args.eos)
    tok_request = ({"train": args.train_tokenizer, "vocab_size": args.vocab_size} if given is None
                   else given.info.to_json())
    request = _request(files, tok_request, args.field, args.holdout_fraction, args.unit_bytes)
    _refuse_if_busy(out)
    _existing(out, request)
    with _locked(out):
        return _prepare_locked(args, files, out, given, request)


def _prepare_locked(args, files: list[InputFile], out: Path, given: Tokenizer | None, request: dict) -> dict:
    meta = _claim(out, request)
    if meta is not None:
        return meta | {"units_resumed": len(meta["shards"])}
    spec, eos = _tokenizer(args, given, files, out)
    info = load_tokenizer(spec, eos).info
    dtype = token_dtype(info.vocab_size)
    units = plan_units(files, args.unit_bytes)
    remove_partial(out)
    records = _finished(out, len(units), dtype.itemsize)
    todo = [i for i in range(len(units)) if i not in records]
    sizes = [unit_bytes_of(u, files) for u in units]
    job = worker.Job(files, str(out), spec, eos, args.field, args.holdout_fraction, args.on_error, dtype.name)
    with tqdm(total=sum(sizes), initial=sum(sizes[i] for i in records), unit="B", unit_scale=True,
              desc="prepare", disable=not args.progress, dynamic_ncols=True) as bar:
        records |= _run(units, todo, job, args.workers, bar, sizes)
    meta = _meta(info, dtype, [records[i] for i in range(len(units))], args)
    write_json(out / META, meta)
    return meta | {"units_resumed": len(units) - len(todo)}


def _meta(info: TokenizerInfo, dtype: np.dtype, records: list[dict], args) -> dict:
    totals = {s: {k: sum(r[s][k] for r in records) for k in ("documents", "tokens", "bytes")} for s in SPLITS}
    return {"format": FORMAT, "version": VERSION, "tokenizer": info.to_json(), "dtype": dtype.name,
            "holdout_fraction": args.holdout_fraction, "field": args.field, **totals,
            "empty_documents": sum(r["empty_documents"] for r in records),
            "skipped": sum(r["skipped"] for r in records),
            "skipped_examples": [e for r in records for e in r["skipped_examples"]][:10],
            "shards": records}


def _check(args) -> None:
    if args.train_tokenizer:
        if args.tokenizer != BYTES or args.eos:
            raise ConfigError("--train-tokenizer trains the tokenizer: give no --tokenizer or --eos with it")
        if not args.vocab_size:
            raise ConfigError("--train-tokenizer bpe needs --vocab-size N")
    elif args.vocab_size:
        raise ConfigError("--vocab-size is for --train-tokenizer")
    if not 0 <= args.holdout_fraction < 1:
        raise ConfigError(f"--holdout-fraction ({args.holdout_fraction}) must be in [0, 1)")
    if args.workers < 0:
        raise ConfigError(f"--workers ({args.workers}) must be >= 0 (0: in this process)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-prepare-data", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", default=[], help="a file, folder or glob (repeatable)")
    p.add_argument("--stdlib", action="store_true", help="the running Python's standard-library *.py files")
    p.add_argument("--output", required=True, help="the dataset directory to write")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="auto: by extension (.jsonl, .parquet; anything else is text)")
    p.add_argument("--glob", default=None, help="files taken from a folder (default by format: **/*.txt, **/*.jsonl, **/*.parquet)")
    p.add_argument("--field", default="text", help="the jsonl field or parquet column holding the text")
    p.add_argument("--tokenizer", default=BYTES, help="bytes, a tokenizer.json, or an HF model directory")
    p.add_argument("--eos", default=None, help="the end-of-document token (default: the model directory's, or a known name)")
    p.add_argument("--train-tokenizer", choices=("bpe",), default=None, help="train a byte-level BPE on the input first")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary of the trained tokenizer")
    p.add_argument("--holdout-fraction", type=float, default=0.05, help="share of documents held out for evaluation")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: every core; 0: this one)")
    p.add_argument("--unit-bytes", type=int, default=DEFAULT_UNIT_BYTES, help="input bytes per shard")
    p.add_argument("--on-error", choices=ON_ERROR, default="fail", help="bad records: fail, or skip and count them")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    start = time.perf_counter()
    try:
        meta = prepare(args)
    except ConfigError as exc:
        print(f"moe-prepare-data: error: {exc}", file=sys.stderr)
        return 2
    except OutputBusy as exc:
        print(f"moe-prepare-data: output in use: {exc}", file=sys.stderr)
        return BUSY_EXIT
    tr, va = meta["train"], meta["val"]
    print(f"{args.output}: {tr['documents']:,} documents, {tr['tokens']:,} tokens ({meta['dtype']}) for training; "
          f"{va['documents']:,} documents, {va['tokens']:,} tokens held out; {meta['empty_documents']} empty "
          f"documents skipped; {meta['skipped']} bad records skipped; {len(meta['shards'])} shards "
          f"({meta['units_resumed']} from an earlier run); {time.perf_counter() - start:.1f} s")
    for example in meta["skipped_examples"]:
        print(f"  skipped: {example}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Exit codes: what a run's exit status means, and the one status of a job of many ranks.

    code  meaning                                            what it leaves on disk
    0     done (or the run had already reached train.steps)  final checkpoint, summary.json
    1     unexpected error (a bug: the traceback is printed) whatever was committed before
    2     config error: the config, the launch or the run dir nothing (refused before writing)
    3     collective failure: a peer died or stalled         the checkpoints committed before
    4     checkpoint error: missing, corrupt, does not fit   nothing new; no checkpoint changed
    5     data error: unreadable, too small, bad token ids   nothing (refused before writing)
    6     diverged: a non-finite loss or gradient norm       the checkpoints before it (finite)
    7     run dir in use: another job holds its lock         nothing (refused before writing)
    8     storage error: a write failed (disk full, ...)     the previous checkpoint, intact
    75    preempted (SIGTERM, SIGUSR1): requeue and resume   a checkpoint of the step it stopped
    130   interrupted (Ctrl-C, SIGINT)                        a checkpoint of the step it stopped

Every rank exits with its own code. A launcher that starts several reports one (job_code):
`launcher.agent` (what `make train` and slurm/train_torchrun.sbatch run: torchrun itself turns
any worker failure into 1), `launcher.simulate`, and `python -m launcher.exit_codes DIR` in a
batch script after srun (slurm/train.sbatch). Ranks write their code and message into
MOE_EXIT_DIR (exit records) when it is set, which is how these learn them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

OK, UNEXPECTED, CONFIG, COLLECTIVE, CHECKPOINT, DATA, DIVERGED, RUN_DIR_BUSY, STORAGE = range(9)
PREEMPTED, INTERRUPTED = 75, 130
MEANING = {OK: "done", UNEXPECTED: "unexpected error", CONFIG: "config error",
           COLLECTIVE: "collective failure", CHECKPOINT: "checkpoint error", DATA: "data error",
           DIVERGED: "diverged", RUN_DIR_BUSY: "run dir in use", STORAGE: "storage error",
           PREEMPTED: "preempted", INTERRUPTED: "interrupted"}
EXIT_DIR_ENV = "MOE_EXIT_DIR"


def code_for(exc: BaseException) -> int:
    """The exit code of an exception that ended a run."""
    from checkpoint.errors import CheckpointError, StorageError
    from launcher.run_dir import RunDirBusy
    from model.errors import ConfigError, DataError
    from parallel.collectives import CollectiveError
    from trainer.divergence import Diverged
    from trainer.signals import Interrupted, Preempted

    for kind, code in ((DataError, DATA), (ConfigError, CONFIG), (CheckpointError, CHECKPOINT),
                       (StorageError, STORAGE), (CollectiveError, COLLECTIVE),
                       (Diverged, DIVERGED), (RunDirBusy, RUN_DIR_BUSY),
                       (Interrupted, INTERRUPTED), (Preempted, PREEMPTED)):
        if isinstance(exc, kind):
            return code
    return UNEXPECTED


def tool_failure(prog: str, exc: Exception) -> int:
    """The exit code of a one-process tool (moe-export, moe-generate) that failed with `exc`,
    having said why; an unexpected error (a bug) is raised again, with its traceback."""
    code = code_for(exc)
    if code == UNEXPECTED:
        raise exc
    print(f"{prog}: {MEANING[code]}: {exc}", file=sys.stderr)
    return code


def describe(code: int) -> str:
    return f"exit code {code}: {MEANING.get(code, 'killed by a signal' if code < 0 else 'unknown')}"


def job_code(codes: list[int | None]) -> int:
    """One code for a job from its ranks' (or agents') codes, None where a rank left no
    record (it was killed). The cause outranks its echoes: a collective failure (3) or an
    unexpected error on some ranks usually follows another rank's failure, so the first
    rank's specific code wins, then 1, then 3; ranks that vanished make it a collective
    failure at least."""
    failed = [c for c in codes if c not in (None, OK)]
    specific = [c for c in failed if c not in (UNEXPECTED, COLLECTIVE)]
    if specific:
        return specific[0]
    if UNEXPECTED in failed:
        return UNEXPECTED
    if failed or None in codes:
        return COLLECTIVE
    return OK


def write_record(rank: int, code: int, message: str | None) -> None:
    """This rank's exit code and message, for the launcher that started it (if it asked)."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    path = Path(folder) / f"rank_{rank:05d}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps({"rank": rank, "code": code, "message": message,
                                   "host": socket.gethostname(), "pid": os.getpid()}))
        os.replace(tmp, path)
    except OSError:
        pass  # the launcher then counts this rank as vanished: never fail an exit over it


def read_records(folder: str | Path) -> dict[int, dict]:
    """rank -> record, for the ranks that wrote one."""
    out = {}
    for path in sorted(Path(folder).glob("rank_*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[record["rank"]] = record
    return out


def summarize(records: dict[int, dict], failures: dict[int, int], expected: int | None) -> int:
    """Print what rank 0 did not, and return the job's code. `failures` holds torchrun's
    exit code per global rank of the workers that failed."""
    ranks = sorted(set(records) | set(failures) | set(range(expected or 0)))
    codes = [records[r]["code"] if r in records else None for r in ranks]
    code = job_code(codes)
    seen = {(records.get(0) or {}).get("message")}
    for r in ranks:
        rec = records.get(r)
        if rec is None and r in failures:
            how = (f"killed by signal {-failures[r]}" if failures[r] < 0
                   else f"exited with {failures[r]} without a record")
            print(f"[rank {r}] {how}", file=sys.stderr, flush=True)
        elif rec and rec["code"] != OK and rec["message"] not in seen:
            seen.add(rec["message"])
            print(f"[rank {r} on {rec['host']}] {MEANING.get(rec['code'])}: "
                  f"{rec['message']}", file=sys.stderr, flush=True)
    if code != OK and (records.get(0) or {}).get("code") != code:
        print(f"job: {describe(code)}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """`python -m launcher.exit_codes DIR [--ranks N]`: the job's exit code from the records
    its ranks wrote into DIR (what a batch script that ran them with srun returns)."""
    parser = argparse.ArgumentParser(prog="python -m launcher.exit_codes", description=main.__doc__)
    parser.add_argument("folder", help="the MOE_EXIT_DIR the ranks wrote into")
    parser.add_argument("--ranks", type=int, default=None, help="the job's world size")
    args = parser.parse_args(argv)
    return summarize(read_records(args.folder), {}, args.ranks)


if __name__ == "__main__":
    sys.exit(main())

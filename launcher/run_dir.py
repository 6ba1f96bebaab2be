"""One job per run directory, and one run per run directory unless asked.

The lock. Rank 0 creates `<run_dir>/LOCK` with O_CREAT | O_EXCL before anything is written
into the run dir, holding the holder's host, pid, job id and start time, and touches it every
HEARTBEAT_S while the job runs; it removes it when the job ends. A second job is refused
(exit code 7) naming the holder. A lock left by a job that died is taken over, and said so,
when it is provably stale: its pid is gone on this host, it belongs to this very job (a
torchrun restart or a Slurm requeue: the same TORCHELASTIC_RUN_ID or SLURM_JOB_ID), or it has
not been touched for STALE_S (read against the file system's own clock, through a probe file,
so clocks of different nodes never compare). Across nodes it relies on what NFSv3+, Lustre,
GPFS and local file systems provide: an atomic O_EXCL create and an atomic rename.

A run dir that holds a run (committed checkpoints, summary.json or TensorBoard events) is
refused to a job that does not resume it, unless logging.start_over is set: the previous
run's files then move into `<run_dir>/previous_<time>/` (nothing is deleted).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from checkpoint.store import committed
from model.errors import ConfigError
from parallel.collectives import broadcast_object

LOCK = "LOCK"
HEARTBEAT_S = 30.0
STALE_S = 600.0


class RunDirBusy(Exception):
    """Another job holds the run dir's lock."""


def job_id() -> str | None:
    """What stays the same across this job's restarts and requeues (None for a plain run)."""
    for name in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(name)
        if value and value != "none":
            return f"{name}={value}"
    return None


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _fs_now(folder: Path) -> float:
    """The file system's clock, as seen in `folder`: the mtime of a file just written there."""
    probe = folder / f".clock-{socket.gethostname()}-{os.getpid()}"
    probe.write_bytes(b"")
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def _stale(holder: dict, age_s: float) -> str | None:
    """Why the lock of `holder` is stale (None: it may be alive)."""
    if holder.get("job") and holder.get("job") == job_id():
        return f"it belongs to this job ({holder['job']}), an earlier attempt"
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return f"process {holder.get('pid')} no longer exists on {holder['host']}"
        except (PermissionError, ValueError):
            pass
    if age_s > STALE_S:
        return f"it has not been refreshed for {age_s:.0f} s (a live job refreshes it every {HEARTBEAT_S:.0f} s)"
    return None


class RunDirLock:
    """Held by rank 0 for the life of the job; the heartbeat thread refreshes it."""

    def __init__(self, run_dir: Path):
        self.path, self.notes = run_dir / LOCK, []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise RunDirBusy naming the holder."""
        for _ in range(3):  # a stale lock taken over by another job between our steps: retry
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_holder(), f)
            self._thread = threading.Thread(target=self._beat, name="run-dir-lock", daemon=True)
            self._thread.start()
            return
        raise RunDirBusy(f"could not take {self.path}: other jobs keep taking it")

    def _take_over_or_refuse(self) -> None:
        try:
            holder = json.loads(self.path.read_text() or "{}")
            age = _fs_now(self.path.parent) - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile
        except ValueError:
            holder, age = {}, _fs_now(self.path.parent) - self.path.stat().st_mtime
        why = _stale(holder, age)
        if why is None:
            raise RunDirBusy(
                f"run dir {self.path.parent} is in use by another job: host {holder.get('host')}, "
                f"pid {holder.get('pid')}, {holder.get('job') or 'no job id'}, started "
                f"{holder.get('started')} (lock {self.path}, refreshed {age:.0f} s ago). Use "
                "another --logging.run_dir, or wait for it; if that job is dead on another host, "
                f"delete {self.path}")
        try:  # rename, not delete: of two jobs taking over at once, only one succeeds
            os.replace(self.path, self.path.with_name(f"{LOCK}.stale"))
        except FileNotFoundError:
            return
        self.notes.append(f"took over the stale lock of host {holder.get('host')}, pid "
                          f"{holder.get('pid')} ({why})")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a run dir that turned read-only: the job reports it where it writes

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def holds_a_run(run_dir: Path) -> str | None:
    """What in `run_dir` belongs to a run (None: nothing)."""
    found = []
    if committed(run_dir / "checkpoints"):
        found.append(f"{len(committed(run_dir / 'checkpoints'))} committed checkpoints")
    if (run_dir / "summary.json").exists():
        found.append("summary.json")
    if any((run_dir / "tensorboard").glob("events.*")):
        found.append("TensorBoard events")
    return ", ".join(found) or None


def claim(run_dir: Path, rank: int, resuming: bool, start_over: bool) -> RunDirLock | None:
    """Lock the run dir and make sure a fresh run does not write into another run's files.
    Collective: rank 0 acts, every rank raises the same error. Returns rank 0's lock."""
    lock, error, kind = None, None, ConfigError
    if rank == 0:
        lock = RunDirLock(run_dir)
        try:
            lock.acquire()
            for note in lock.notes:
                print(f"warning: {note}", flush=True)
            there = None if resuming else holds_a_run(run_dir)
            if there and start_over:
                moved = move_aside(run_dir)
                print(f"warning: logging.start_over: the previous run's files in {run_dir} "
                      f"({there}) moved to {moved}", flush=True)
            elif there:
                error = (f"logging.run_dir ({run_dir}) holds a run ({there}). Continue it with "
                         "--checkpoint.resume=auto, start elsewhere with --logging.run_dir=DIR, or "
                         "start over with --logging.start_over=true (its files move to "
                         f"{run_dir}/previous_<time>/)")
        except RunDirBusy as exc:
            error, kind = str(exc), RunDirBusy
        except OSError as exc:
            error = f"logging.run_dir ({run_dir}): {exc}"
        if error:
            lock.release()
    # Rank 0 alone looked: every rank raises its verdict, word for word.
    error, busy = broadcast_object((error, kind is RunDirBusy))
    if error:
        raise (RunDirBusy if busy else ConfigError)(error)
    return lock


def move_aside(run_dir: Path) -> Path:
    """Move what `run_dir` holds (but its lock and earlier moves) into previous_<time>/."""
    target = run_dir / time.strftime("previous_%Y%m%d-%H%M%S")
    target.mkdir()
    for entry in run_dir.iterdir():
        if entry.name != LOCK and entry != target and not entry.name.startswith(("previous_", f"{LOCK}.")):
            os.replace(entry, target / entry.name)
    return target

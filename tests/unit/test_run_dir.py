"""The run dir's lock and its one-run rule (launcher/run_dir.py), in one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from launcher import run_dir as rd
from launcher.run_dir import LOCK, RunDirBusy, RunDirLock, holds_a_run


def _lock_file(path, **holder):
    base = {"host": socket.gethostname(), "pid": os.getpid(), "job": None, "started": "then"}
    (path / LOCK).write_text(json.dumps(base | holder))


@pytest.fixture
def live_pid():
    """A process of this host that outlives the test's checks."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_the_lock_names_its_holder_and_is_released(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    lock = RunDirLock(tmp_path)
    lock.acquire()
    holder = json.loads((tmp_path / LOCK).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    assert holder["job"] == "TORCHELASTIC_RUN_ID=abc" and holder["started"]
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_live_holder_is_refused_by_name(tmp_path, live_pid, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    _lock_file(tmp_path, pid=live_pid, job="SLURM_JOB_ID=17")
    with pytest.raises(RunDirBusy, match=rf"in use by another job: host {socket.gethostname()}, "
                       rf"pid {live_pid}, SLURM_JOB_ID=17"):
        RunDirLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == live_pid  # left alone


def test_a_holder_on_another_host_is_refused_until_its_lock_goes_stale(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    _lock_file(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(RunDirBusy, match="host elsewhere"):
        RunDirLock(tmp_path).acquire()
    old = (tmp_path / LOCK).stat().st_mtime - rd.STALE_S - 5
    os.utime(tmp_path / LOCK, (old, old))
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert "has not been refreshed" in lock.notes[0] and "elsewhere" in lock.notes[0]
    lock.release()


def test_a_dead_holder_on_this_host_or_an_earlier_attempt_of_this_job_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock_file(tmp_path, pid=dead.pid)
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert f"process {dead.pid} no longer exists" in lock.notes[0]
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    _lock_file(tmp_path, host="other-node", pid=1, job="SLURM_JOB_ID=42")  # a requeue
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert "belongs to this job (SLURM_JOB_ID=42)" in lock.notes[0]
    lock.release()


def test_the_heartbeat_keeps_a_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(rd, "HEARTBEAT_S", 0.05)
    lock = RunDirLock(tmp_path)
    lock.acquire()
    old = (tmp_path / LOCK).stat().st_mtime - 1000
    os.utime(tmp_path / LOCK, (old, old))
    import time

    time.sleep(0.5)
    assert (tmp_path / LOCK).stat().st_mtime > old + 900
    lock.release()


def test_what_makes_a_run_dir_hold_a_run(tmp_path):
    assert holds_a_run(tmp_path) is None
    (tmp_path / "config.yaml").write_text("x: 1\n")
    (tmp_path / "placement.json").write_text("[]")
    assert holds_a_run(tmp_path) is None  # a start that never trained
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    assert holds_a_run(tmp_path) == "TensorBoard events"
    (tmp_path / "summary.json").write_text("{}")
    step = tmp_path / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    (step / "COMMIT").write_text("x")
    assert holds_a_run(tmp_path) == "1 committed checkpoints, summary.json, TensorBoard events"


def test_starting_over_moves_the_previous_run_aside(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / LOCK).write_text("{}")
    moved = rd.move_aside(tmp_path)
    assert moved.parent == tmp_path and moved.name.startswith("previous_")
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK, moved.name])
